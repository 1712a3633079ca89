//! Parity of the backbones with Hugging Face transformers + PIL, on the tiny random-weight
//! fixtures made by `scripts/make-fixtures.py` (expected outputs committed beside them), plus the
//! real-weights check that `scripts/check-real-parity.sh` drives.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use multiclip::backbone::preprocess::{Filter, ImagePreprocess, resample};
use multiclip::backbone::{self, Sample};
use multiclip::data::image::{DEFAULT_MAX_PIXELS, load_rgb};

#[path = "support/kernel_paths.rs"]
mod kernel_paths;

use kernel_paths::max_abs_diff;

const DINOV2: &str = "tests/fixtures/dinov2-tiny";
const MINILM: &str = "tests/fixtures/minilm-tiny";

fn expected(dir: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(Path::new(dir).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn fixture_images(dir: &str) -> Vec<(String, PathBuf)> {
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(Path::new(dir).join("images.json")).unwrap())
            .unwrap();
    names
        .into_iter()
        .map(|file| {
            (
                file.trim_end_matches(".png").to_string(),
                Path::new(dir).join(file),
            )
        })
        .collect()
}

fn image_samples(dir: &str) -> Vec<Sample> {
    fixture_images(dir)
        .into_iter()
        .map(|(name, path)| Sample {
            id: name,
            image: Some(load_rgb(&path, DEFAULT_MAX_PIXELS).unwrap()),
            caption: String::new(),
        })
        .collect()
}

fn caption_samples(captions: &[String]) -> Vec<Sample> {
    captions
        .iter()
        .enumerate()
        .map(|(i, c)| Sample {
            id: i.to_string(),
            image: None,
            caption: c.clone(),
        })
        .collect()
}

fn fixture_captions() -> Vec<String> {
    serde_json::from_str(&std::fs::read_to_string(Path::new(MINILM).join("captions.json")).unwrap())
        .unwrap()
}

#[test]
fn pil_resampling_is_bit_exact() {
    let expected = expected(DINOV2);
    let photo = image::open(Path::new(DINOV2).join("landscape.png"))
        .unwrap()
        .to_rgb8();
    let mut checked = 0;
    for (filter, name) in [
        (Filter::Bilinear, "bilinear"),
        (Filter::Bicubic, "bicubic"),
        (Filter::Lanczos, "lanczos"),
    ] {
        for (w, h) in [(37u32, 29u32), (200, 150)] {
            let want = &expected[&format!("resample.{name}.{w}x{h}")];
            let got = resample(&photo, w, h, filter);
            let got = Tensor::from_vec(got.into_raw(), (h as usize, w as usize, 3), &Device::Cpu)
                .unwrap();
            assert_eq!(max_abs_diff(&got, want), 0.0, "{name} {w}x{h}");
            checked += 1;
        }
    }
    assert_eq!(checked, 6);
}

#[test]
fn image_preprocessing_matches_hf_pil_processor() {
    let expected = expected(DINOV2);
    let pre = ImagePreprocess::from_hf_config(&Path::new(DINOV2).join("preprocessor_config.json"))
        .unwrap();
    for sample in image_samples(DINOV2) {
        let (values, (h, w)) = pre.apply(sample.image.as_ref().unwrap());
        let got = Tensor::from_vec(values, (3, h as usize, w as usize), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&got, &expected[&format!("pixel_values.{}", sample.id)]);
        // Bit-exact uint8 resampling leaves only f32 rounding of the normalisation.
        assert!(diff <= 1e-6, "{}: max abs diff {diff}", sample.id);
    }
}

#[test]
fn dinov2_tiny_matches_transformers_end_to_end() {
    let expected = expected(DINOV2);
    let model = backbone::load(&format!("dinov2:{DINOV2}"), &Device::Cpu).unwrap();
    let names: Vec<&str> = ["image", "image_patch_mean"].into();
    assert_eq!(
        model
            .outputs()
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>(),
        names
    );
    assert_eq!(model.outputs()[0].shape, vec![32]);
    let samples = image_samples(DINOV2);
    let outputs = model.forward(model.prepare(&samples).unwrap()).unwrap();
    for (name, got) in names.iter().zip(&outputs) {
        let diff = max_abs_diff(got, &expected[*name]);
        println!("dinov2-tiny {name}: max abs diff {diff:e}");
        assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
    }
    // A batch of one gives the same row as the full batch.
    let single = model
        .forward(model.prepare(&samples[1..2]).unwrap())
        .unwrap();
    assert!(max_abs_diff(&single[0], &outputs[0].narrow(0, 1, 1).unwrap()) <= 1e-5);
    let info = model.info();
    assert_eq!(info.weights_sha256.len(), 1);
    assert_eq!(info.weights_sha256[0].0, "model.safetensors");
}

#[test]
fn sentence_tiny_matches_transformers_in_original_order() {
    let expected = expected(MINILM);
    let model = backbone::load(&format!("sentence:{MINILM}"), &Device::Cpu).unwrap();
    assert_eq!(model.outputs()[0].name, "text");
    let captions = fixture_captions();
    let outputs = model
        .forward(model.prepare(&caption_samples(&captions)).unwrap())
        .unwrap();
    let diff = max_abs_diff(&outputs[0], &expected["text"]);
    println!("minilm-tiny text: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "text: max abs diff {diff}");
    assert_eq!(model.info().preprocessing["text"]["normalize"], true);
    assert_eq!(model.info().preprocessing["text"]["max_tokens"], 16);
}

/// What CUDA runs (the device-generic ops) equals the fused CPU kernels, on both fixtures.
#[test]
fn generic_path_equals_fused_path() {
    kernel_paths::assert_generic_equals_fused(&format!("dinov2:{DINOV2}"), &image_samples(DINOV2));
    let captions = caption_samples(&fixture_captions());
    kernel_paths::assert_generic_equals_fused(&format!("sentence:{MINILM}"), &captions);
}

/// `--precision bf16` (the CPU's bf16 products and candle's bf16 dtype) and `f16` stay within
/// cosine 0.999 of f32 on every output row.
#[test]
fn reduced_precisions_stay_close_to_f32() {
    let spec = format!("dinov2:{DINOV2}");
    kernel_paths::assert_reduced_precisions_close(&spec, &image_samples(DINOV2));
    let captions = caption_samples(&fixture_captions());
    kernel_paths::assert_reduced_precisions_close(&format!("sentence:{MINILM}"), &captions);
}

#[test]
fn combined_spec_merges_outputs_of_both_backbones() {
    let model =
        backbone::load(&format!("dinov2:{DINOV2}+sentence:{MINILM}"), &Device::Cpu).unwrap();
    let names: Vec<String> = model.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["image", "image_patch_mean", "text"]);
    assert!(model.needs_images() && model.needs_text());
    let mut samples = image_samples(DINOV2);
    for (sample, caption) in samples.iter_mut().zip(fixture_captions()) {
        sample.caption = caption;
    }
    let outputs = model.forward(model.prepare(&samples).unwrap()).unwrap();
    assert_eq!(outputs.len(), 3);
    assert!(max_abs_diff(&outputs[0], &expected(DINOV2)["image"]) <= 1e-4);
    assert_eq!(outputs[2].dims(), [samples.len(), 16]);
    assert_eq!(model.info().weights_sha256.len(), 2);
}

/// Copies the DINOv2 fixture with its weights altered by `edit`.
fn broken_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(Path::new(DINOV2).join(file), dir.path().join(file)).unwrap();
    }
    let mut weights =
        candle_core::safetensors::load(Path::new(DINOV2).join("model.safetensors"), &Device::Cpu)
            .unwrap();
    edit(&mut weights);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn missing_or_misshaped_tensor_is_an_error_naming_tensor_and_file() {
    let name = "encoder.layer.1.mlp.fc1.weight";
    let dir = broken_copy(|w| {
        w.remove(name);
    });
    let err = format!(
        "{:#}",
        backbone::load(&format!("dinov2:{}", dir.path().display()), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains(name) && err.contains("model.safetensors"),
        "{err}"
    );

    let dir = broken_copy(|w| {
        let t = w[name].t().unwrap().contiguous().unwrap();
        w.insert(name.to_string(), t);
    });
    let err = format!(
        "{:#}",
        backbone::load(&format!("dinov2:{}", dir.path().display()), &Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(
        err.contains(name) && err.contains("model.safetensors") && err.contains("shape"),
        "{err}"
    );
}

/// Real weights (models/, from scripts/fetch-weights.sh) against transformers outputs written by
/// scripts/check-real-parity.sh: cosine >= 0.9999 for every embedding. Skips when absent.
#[test]
fn real_weights_match_transformers() {
    let reference = Path::new("models/.parity/expected.safetensors");
    let inputs = Path::new("models/.parity/inputs.json");
    let models = [
        Path::new("models/dinov2-small/model.safetensors"),
        Path::new("models/all-MiniLM-L6-v2/model.safetensors"),
    ];
    if let Some(missing) = models
        .iter()
        .chain([&reference, &inputs])
        .find(|p| !p.exists())
    {
        println!(
            "skipped: {} is missing (run scripts/check-real-parity.sh)",
            missing.display()
        );
        return;
    }
    #[derive(serde::Deserialize)]
    struct Inputs {
        images: Vec<PathBuf>,
        captions: Vec<String>,
    }
    let inputs: Inputs = serde_json::from_str(&std::fs::read_to_string(inputs).unwrap()).unwrap();
    let expected = candle_core::safetensors::load(reference, &Device::Cpu).unwrap();
    let model = backbone::load(
        "dinov2:models/dinov2-small+sentence:models/all-MiniLM-L6-v2",
        &Device::Cpu,
    )
    .unwrap();
    let samples: Vec<Sample> = inputs
        .images
        .iter()
        .zip(&inputs.captions)
        .map(|(path, caption)| Sample {
            id: path.display().to_string(),
            image: Some(load_rgb(path, DEFAULT_MAX_PIXELS).unwrap()),
            caption: caption.clone(),
        })
        .collect();
    // Preprocessing alone: the HF PIL processor's pixel values, image by image.
    let pre =
        ImagePreprocess::from_hf_config(Path::new("models/dinov2-small/preprocessor_config.json"))
            .unwrap();
    let mut worst_pixel = 0f32;
    for (i, sample) in samples.iter().enumerate() {
        let (values, (h, w)) = pre.apply(sample.image.as_ref().unwrap());
        let got = Tensor::from_vec(values, (3, h as usize, w as usize), &Device::Cpu).unwrap();
        worst_pixel = worst_pixel.max(max_abs_diff(
            &got,
            &expected["pixel_values"].get(i).unwrap(),
        ));
    }
    assert!(
        worst_pixel <= 1e-6,
        "preprocessing differs from the HF PIL processor by {worst_pixel}"
    );
    let mut worst = f32::MAX;
    const BATCH: usize = 8;
    for (k, chunk) in samples.chunks(BATCH).enumerate() {
        let start = k * BATCH;
        let outputs = model.forward(model.prepare(chunk).unwrap()).unwrap();
        for (spec, got) in model.outputs().iter().zip(&outputs) {
            let want = expected[&spec.name].narrow(0, start, chunk.len()).unwrap();
            let dot = (got * &want).unwrap().sum(1).unwrap();
            let norms = (got.sqr().unwrap().sum(1).unwrap().sqrt().unwrap()
                * want.sqr().unwrap().sum(1).unwrap().sqrt().unwrap())
            .unwrap();
            let cos: Vec<f32> = (dot / norms).unwrap().to_vec1().unwrap();
            for (i, c) in cos.iter().enumerate() {
                assert!(*c >= 0.9999, "{} of {}: cosine {c}", spec.name, chunk[i].id);
                worst = worst.min(*c);
            }
        }
    }
    println!(
        "real weights: {} samples, lowest cosine {worst}, preprocessing max abs diff {worst_pixel:e}",
        samples.len()
    );
}

/// `image_tokens=true`: the final layer norm's every token, as transformers' last_hidden_state;
/// its first row is the `image` output and the mean of the rest `image_patch_mean`.
#[test]
fn dinov2_image_tokens_are_the_last_hidden_state() {
    let expected = expected(DINOV2);
    let model =
        backbone::load(&format!("dinov2:{DINOV2}:image_tokens=true"), &Device::Cpu).unwrap();
    let outputs = model.outputs();
    assert_eq!(outputs[2].name, "image_tokens");
    // A 28-pixel crop in patches of 4: CLS + 7 x 7.
    assert_eq!(outputs[2].shape, [50, 32]);
    let samples = image_samples(DINOV2);
    let got = model.forward(model.prepare(&samples).unwrap()).unwrap();
    assert_eq!(got.len(), 3);
    let tokens = &got[2];
    assert_eq!(tokens.dims(), [samples.len(), 50, 32]);
    let diff = max_abs_diff(tokens, &expected["last_hidden_state"]);
    println!("dinov2-tiny image_tokens: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "image_tokens: max abs diff {diff}");
    let cls = tokens.narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    assert_eq!(max_abs_diff(&cls, &got[0]), 0.0);
    let mean = tokens.narrow(1, 1, 49).unwrap().mean(1).unwrap();
    assert!(max_abs_diff(&mean, &got[1]) <= 1e-6);
    // The pooled outputs are those of the plain backbone.
    let plain = backbone::load(&format!("dinov2:{DINOV2}"), &Device::Cpu).unwrap();
    let pooled = plain.forward(plain.prepare(&samples).unwrap()).unwrap();
    assert_eq!(max_abs_diff(&pooled[0], &got[0]), 0.0);
    let err = backbone::load(&format!("dinov2:{DINOV2}:image_tokenz=true"), &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("image_tokenz"), "{err:#}");
}

/// `text_tokens=true`: the token states (last_hidden_state) of each caption, zero after its
/// last token, with the attention mask; their masked mean, normalised, is the `text` output.
#[test]
fn sentence_text_tokens_are_the_last_hidden_state_with_their_mask() {
    let expected = expected(MINILM);
    let model =
        backbone::load(&format!("sentence:{MINILM}:text_tokens=true"), &Device::Cpu).unwrap();
    let names: Vec<String> = model.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["text", "text_tokens", "text_mask"]);
    assert_eq!(model.outputs()[1].shape, [16, 16]);
    assert_eq!(model.outputs()[2].shape, [16]);
    assert_eq!(model.outputs()[2].kind, backbone::OutputKind::Mask);
    let captions = fixture_captions();
    let got = model
        .forward(model.prepare(&caption_samples(&captions)).unwrap())
        .unwrap();
    assert!(max_abs_diff(&got[0], &expected["text"]) <= 1e-4);
    let mask = expected["attention_mask"]
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    assert_eq!(max_abs_diff(&got[2], &mask), 0.0);
    // transformers' states where the mask is 1 (its padding rows are not zeroed).
    let keep = mask.unsqueeze(2).unwrap();
    let want = expected["last_hidden_state"].broadcast_mul(&keep).unwrap();
    let diff = max_abs_diff(&got[1], &want);
    println!("minilm-tiny text_tokens: max abs diff {diff:e}");
    assert!(diff <= 1e-4, "text_tokens: max abs diff {diff}");
    let pooled = multiclip::tensor_ops::l2_normalize(
        &multiclip::tensor_ops::masked_mean(&got[1], Some(&got[2])).unwrap(),
    )
    .unwrap();
    assert!(max_abs_diff(&pooled, &got[0]) <= 1e-6);
}
