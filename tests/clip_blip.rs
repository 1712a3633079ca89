//! Parity of the CLIP and BLIP-ITM backbones with Hugging Face transformers on random-weight
//! models in the Hub layout, made by scripts/make-clip-blip-fixtures.py: the tiny committed ones
//! (tests/fixtures/{clip,blip}-tiny) always, full-size ones with
//! `MULTICLIP_PARITY_DIRS=dir,dir cargo test --release --test clip_blip -- --ignored`
//! (scripts/check-clip-blip-parity.sh). Every output within 1e-4 in f32, on a batch with
//! captions of different lengths (one truncated), a grayscale and non-square images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multiclip::backbone::blip::{
    BLIP_DEFAULT_TEMPLATE, BLIP_TEXT_TOKENS, BlipConfig, BlipItmModel, blip_caption_case,
};
use multiclip::backbone::clip::{ClipConfig, ClipModel};
use multiclip::backbone::source::Weights;
use multiclip::backbone::text::{encode, load_tokenizer};
use multiclip::backbone::{self, OutputKind, Sample};
use multiclip::tensor_ops::Kernels;

#[path = "support/kernel_paths.rs"]
mod kernel_paths;

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let path = dir.join("parity/expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("reading {}", path.display()))
}

fn weights(dir: &Path) -> Result<Weights> {
    // SAFETY: the memory-mapped fixture is only read, and nothing writes it while the test runs.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    Ok(Weights::new(vb, Kernels::Fused))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    let diff = max_abs_diff(got, want)?;
    println!("{name}: max abs diff {diff:.3e}");
    assert!(
        diff <= TOLERANCE,
        "{name}: max abs diff {diff} > {TOLERANCE}"
    );
    Ok(())
}

/// Token ids and attention mask, one row per sample.
type IdsAndMask = (Vec<Vec<u32>>, Vec<Vec<u8>>);

/// Rows of the [B, T] i64 `input_ids` / `attention_mask` as u32 ids and u8 mask.
fn ids_and_mask(e: &HashMap<String, Tensor>) -> Result<IdsAndMask> {
    let ids: Vec<Vec<i64>> = e["input_ids"].to_vec2()?;
    let mask: Vec<Vec<i64>> = e["attention_mask"].to_vec2()?;
    Ok((
        ids.iter()
            .map(|r| r.iter().map(|&v| v as u32).collect())
            .collect(),
        mask.iter()
            .map(|r| r.iter().map(|&v| v as u8).collect())
            .collect(),
    ))
}

#[derive(serde::Deserialize)]
struct SampleFile {
    image: String,
    caption: String,
}

fn sample_files(dir: &Path) -> Result<Vec<SampleFile>> {
    let path = dir.join("parity/samples.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

/// The parity samples as the extractor hands them to a backbone (PNG decoded to RGB).
fn samples(dir: &Path) -> Result<Vec<Sample>> {
    sample_files(dir)?
        .into_iter()
        .map(|s| {
            let path = dir.join("parity").join(&s.image);
            let image = image::open(&path)
                .with_context(|| format!("decoding {}", path.display()))?
                .to_rgb8();
            Ok(Sample {
                id: s.image,
                image: Some(image),
                caption: s.caption,
            })
        })
        .collect()
}

/// Full path: `backbone::load(spec)`, PNG files -> prepare -> forward, against transformers
/// (image processor, tokenizer and model).
fn check_backbone(spec: &str, dir: &Path) -> Result<()> {
    let backbone = backbone::load(spec, &Device::Cpu)?;
    let e = expected(dir)?;
    let outputs = backbone.outputs();
    let got = backbone.forward(backbone.prepare(&samples(dir)?)?)?;
    assert_eq!(got.len(), outputs.len());
    for (spec, got) in outputs.iter().zip(&got) {
        assert_eq!(&got.dims()[1..], spec.shape.as_slice(), "{}", spec.name);
        let want = e
            .get(&spec.name)
            .with_context(|| format!("no expected {}", spec.name))?;
        if spec.kind == OutputKind::Mask {
            assert_eq!(max_abs_diff(got, want)?, 0.0, "{}", spec.name);
        } else {
            assert_close(&format!("{} {}", backbone.info().id, spec.name), got, want)?;
        }
    }
    Ok(())
}

fn clip_model_parity(dir: &Path) -> Result<()> {
    let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
    let model = ClipModel::new(&cfg, weights(dir)?)?;
    let e = expected(dir)?;
    let (image, tokens) = model.image_features(&e["pixel_values"], true)?;
    assert_close("clip model image", &image, &e["image"])?;
    let tokens = tokens.expect("asked for tokens");
    assert_close("clip model image_tokens", &tokens, &e["image_tokens"])?;
    let (image_only, none) = model.image_features(&e["pixel_values"], false)?;
    assert!(none.is_none());
    assert_close("clip model image (no tokens)", &image_only, &e["image"])?;
    let (ids, _) = ids_and_mask(&e)?;
    assert_close("clip model text", &model.text_features(&ids)?, &e["text"])?;
    Ok(())
}

fn blip_model_parity(dir: &Path) -> Result<()> {
    let cfg = BlipConfig::from_file(&dir.join("config.json"))?;
    let model = BlipItmModel::new(&cfg, weights(dir)?)?;
    let e = expected(dir)?;
    let (ids, mask) = ids_and_mask(&e)?;
    let out = model.forward(&e["pixel_values"], &ids.concat(), &mask.concat())?;
    assert_close("blip model image", &out.image, &e["image"])?;
    assert_close("blip model text", &out.text, &e["text"])?;
    assert_close(
        "blip model multimodal_tokens",
        &out.multimodal_tokens,
        &e["multimodal_tokens"],
    )?;
    Ok(())
}

fn clip_tokenizer_parity(dir: &Path) -> Result<()> {
    let tok = load_tokenizer(&dir.join("tokenizer.json"), 77, None)?;
    let (want_ids, want_mask) = ids_and_mask(&expected(dir)?)?;
    for (i, s) in sample_files(dir)?.iter().enumerate() {
        let (ids, mask) = encode(&tok, &s.caption)?;
        let n = want_mask[i].iter().filter(|&&m| m == 1).count();
        assert_eq!(ids, want_ids[i][..n], "caption {i}: {:?}", s.caption);
        assert!(mask.iter().all(|&m| m == 1));
    }
    Ok(())
}

fn blip_tokenizer_parity(dir: &Path) -> Result<()> {
    let tok = load_tokenizer(&dir.join("tokenizer.json"), BLIP_TEXT_TOKENS, Some(0))?;
    let (want_ids, want_mask) = ids_and_mask(&expected(dir)?)?;
    for (i, s) in sample_files(dir)?.iter().enumerate() {
        let text = BLIP_DEFAULT_TEMPLATE.replace("{caption}", &blip_caption_case(&s.caption));
        let (ids, mask) = encode(&tok, &text)?;
        assert_eq!(ids, want_ids[i], "caption {i}: {text:?}");
        assert_eq!(mask, want_mask[i], "caption {i}: {text:?}");
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let location = dir.display();
    match config["model_type"].as_str() {
        Some("clip") => {
            clip_tokenizer_parity(dir)?;
            clip_model_parity(dir)?;
            check_backbone(&format!("clip:\"{location}\":image_tokens=true"), dir)
        }
        Some("blip") => {
            blip_tokenizer_parity(dir)?;
            blip_model_parity(dir)?;
            check_backbone(&format!("blip:{location}"), dir)
        }
        other => anyhow::bail!("{location}: model_type {other:?} is neither clip nor blip"),
    }
}

#[test]
fn clip_tiny_matches_transformers() -> Result<()> {
    check_dir(&fixture("clip-tiny"))
}

#[test]
fn blip_tiny_matches_transformers() -> Result<()> {
    check_dir(&fixture("blip-tiny"))
}

/// The backbone spec and parity samples of each tiny fixture (CLIP with its token output).
fn tiny_backbones() -> Result<Vec<(String, Vec<Sample>)>> {
    let (clip, blip) = (fixture("clip-tiny"), fixture("blip-tiny"));
    Ok(vec![
        (
            format!("clip:\"{}\":image_tokens=true", clip.display()),
            samples(&clip)?,
        ),
        (format!("blip:{}", blip.display()), samples(&blip)?),
    ])
}

/// What CUDA runs (the device-generic ops) equals the fused CPU kernels: every output of both
/// models, the BLIP ITM text encoder's cross-attention included.
#[test]
fn generic_path_equals_fused_path() -> Result<()> {
    for (spec, samples) in tiny_backbones()? {
        kernel_paths::assert_generic_equals_fused(&spec, &samples);
    }
    Ok(())
}

/// `--precision bf16` (the CPU's bf16 products and candle's bf16 dtype) and `f16` stay within
/// cosine 0.999 of f32 on every output row.
#[test]
fn reduced_precisions_stay_close_to_f32() -> Result<()> {
    for (spec, samples) in tiny_backbones()? {
        kernel_paths::assert_reduced_precisions_close(&spec, &samples);
    }
    Ok(())
}

#[test]
fn clip_outputs_follow_options() -> Result<()> {
    let dir = fixture("clip-tiny");
    let plain = backbone::load(&format!("clip:{}", dir.display()), &Device::Cpu)?;
    let names: Vec<String> = plain.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["image", "text"]);
    assert_eq!(plain.info().text_template.as_deref(), Some("{caption}"));
    let spec = format!("clip:\"{}\":template=a photo of {{caption}}", dir.display());
    let templated = backbone::load(&spec, &Device::Cpu)?;
    assert_eq!(
        templated.info().text_template.as_deref(),
        Some("a photo of {caption}")
    );
    let got = templated.forward(templated.prepare(&samples(&dir)?)?)?;
    // Same images, other text.
    assert!(max_abs_diff(&got[0], &expected(&dir)?["image"])? <= TOLERANCE);
    assert!(max_abs_diff(&got[1], &expected(&dir)?["text"])? > 1e-3);
    let image_only = backbone::load(
        &format!(
            "clip:\"{}\":image_only=true,image_tokens=true",
            dir.display()
        ),
        &Device::Cpu,
    )?;
    let names: Vec<String> = image_only.outputs().into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["image", "image_tokens"]);
    assert!(!image_only.needs_text());
    let got = image_only.forward(image_only.prepare(&samples(&dir)?)?)?;
    assert_eq!(got.len(), 2);
    assert!(max_abs_diff(&got[0], &expected(&dir)?["image"])? <= TOLERANCE);
    assert!(max_abs_diff(&got[1], &expected(&dir)?["image_tokens"])? <= TOLERANCE);
    let bad = backbone::load(
        &format!("clip:\"{}\":colour=red", dir.display()),
        &Device::Cpu,
    );
    assert!(format!("{:#}", bad.err().unwrap()).contains("colour"));
    Ok(())
}

/// Full-size random-weight models (not committed): see scripts/check-clip-blip-parity.sh.
#[test]
#[ignore]
fn full_size_matches_transformers() -> Result<()> {
    let dirs = std::env::var("MULTICLIP_PARITY_DIRS")
        .context("set MULTICLIP_PARITY_DIRS to comma-separated model directories")?;
    for dir in dirs.split(',').filter(|d| !d.is_empty()) {
        println!("== {dir}");
        check_dir(Path::new(dir))?;
    }
    Ok(())
}
