"""Copy a multiclip cache with every pooled feature L2-normalised per row (a workaround for heads
that concatenate raw features of very different scales; see docs/results.md).

    $PY scripts/normalise-cache.py cache/oc-train cache/ocn-train
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=False)
manifest = json.loads((src / "manifest.json").read_text())
pooled = {o["name"] for o in manifest["outputs"] if o["kind"] == "feature" and len(o["shape"]) == 1}
for shard in manifest["shards"]:
    with safe_open(str(src / shard["file"]), "np") as f:
        meta = f.metadata()
        tensors = {}
        for name in f.keys():
            x = f.get_tensor(name)
            if name in pooled:
                x32 = x.astype(np.float32)
                x = (x32 / np.maximum(np.linalg.norm(x32, axis=1, keepdims=True), 1e-12)).astype(x.dtype)
            tensors[name] = x
    out = dst / shard["file"]
    save_file(tensors, str(out), metadata=meta)
    data = out.read_bytes()
    shard["bytes"], shard["sha256"] = len(data), hashlib.sha256(data).hexdigest()
(dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
print(f"wrote {dst} ({len(manifest['shards'])} shards, normalised: {sorted(pooled)})")
