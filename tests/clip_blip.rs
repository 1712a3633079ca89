//! Parity of the CLIP and BLIP-ITM backbones with Hugging Face transformers on tiny random-weight
//! models in the Hub layout (tests/fixtures/{clip,blip}-tiny, made by
//! scripts/make-clip-blip-fixtures.py): every output within 1e-4 in f32.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use multiclip::backbone::blip::{
    BLIP_DEFAULT_TEMPLATE, BLIP_TEXT_TOKENS, BlipConfig, BlipItmModel, blip_caption_case,
};
use multiclip::backbone::clip::{ClipConfig, ClipModel, encode, load_tokenizer};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(dir: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        dir.join("parity/expected.safetensors"),
        &Device::Cpu,
    )?)
}

fn weights(dir: &Path) -> Result<VarBuilder<'static>> {
    Ok(unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    })
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

/// Rows of an [B, T] i64 tensor as u32 ids and u8 mask.
fn ids_and_mask(e: &HashMap<String, Tensor>) -> Result<(Vec<Vec<u32>>, Vec<Vec<u8>>)> {
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

#[test]
fn clip_model_matches_transformers() -> Result<()> {
    let dir = fixture("clip-tiny");
    let cfg = ClipConfig::from_file(&dir.join("config.json"))?;
    let model = ClipModel::load(weights(&dir)?, &cfg)?;
    let e = expected(&dir)?;
    let (image, tokens) = model.image_features(&e["pixel_values"], true)?;
    assert_close("clip image", &image, &e["image"])?;
    assert_close(
        "clip image_tokens",
        &tokens.expect("asked for tokens"),
        &e["image_tokens"],
    )?;
    let (image_only, none) = model.image_features(&e["pixel_values"], false)?;
    assert!(none.is_none());
    assert_close("clip image (no tokens)", &image_only, &e["image"])?;
    let (ids, _) = ids_and_mask(&e)?;
    assert_close("clip text", &model.text_features(&ids)?, &e["text"])?;
    Ok(())
}

#[test]
fn blip_model_matches_transformers() -> Result<()> {
    let dir = fixture("blip-tiny");
    let cfg = BlipConfig::from_file(&dir.join("config.json"))?;
    let model = BlipItmModel::load(weights(&dir)?, &cfg)?;
    let e = expected(&dir)?;
    let (ids, mask) = ids_and_mask(&e)?;
    let out = model.forward(&e["pixel_values"], &ids.concat(), &mask.concat())?;
    assert_close("blip image", &out.image, &e["image"])?;
    assert_close("blip text", &out.text, &e["text"])?;
    assert_close(
        "blip multimodal_tokens",
        &out.multimodal_tokens,
        &e["multimodal_tokens"],
    )?;
    Ok(())
}

#[derive(serde::Deserialize)]
struct Sample {
    image: String,
    caption: String,
}

fn samples(dir: &Path) -> Result<Vec<Sample>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("parity/samples.json"),
    )?)?)
}

#[test]
fn clip_tokenizer_matches_transformers() -> Result<()> {
    let dir = fixture("clip-tiny");
    let tok = load_tokenizer(&dir.join("tokenizer.json"), 77, None)?;
    let (want_ids, want_mask) = ids_and_mask(&expected(&dir)?)?;
    for (i, s) in samples(&dir)?.iter().enumerate() {
        let (ids, mask) = encode(&tok, &s.caption)?;
        let n = want_mask[i].iter().filter(|&&m| m == 1).count();
        assert_eq!(ids, want_ids[i][..n], "caption {i}: {:?}", s.caption);
        assert!(mask.iter().all(|&m| m == 1));
    }
    Ok(())
}

#[test]
fn blip_tokenizer_matches_transformers() -> Result<()> {
    let dir = fixture("blip-tiny");
    let tok = load_tokenizer(&dir.join("tokenizer.json"), BLIP_TEXT_TOKENS, Some(0))?;
    let (want_ids, want_mask) = ids_and_mask(&expected(&dir)?)?;
    for (i, s) in samples(&dir)?.iter().enumerate() {
        let text = BLIP_DEFAULT_TEMPLATE.replace("{caption}", &blip_caption_case(&s.caption));
        let (ids, mask) = encode(&tok, &text)?;
        assert_eq!(ids, want_ids[i], "caption {i}: {text:?}");
        assert_eq!(mask, want_mask[i], "caption {i}: {text:?}");
    }
    Ok(())
}
