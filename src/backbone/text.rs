//! Captions to token ids with a model's own `tokenizer.json`: loading it with the model's length
//! limit (truncation that keeps the end token, optional fixed padding) and encoding one caption
//! into ids and an attention mask.

use std::path::Path;

use anyhow::{Context, Result};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Reads `tokenizer.json` as it is.
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow::anyhow!("reading tokenizer {}: {e}", path.display()))
}

/// Sets truncation to `max_length` tokens (special tokens included, so the end token survives)
/// and, when `pad_id` is given, padding to exactly `max_length` with that id; any truncation or
/// padding stored in the file (`path`, for messages) is replaced.
pub fn set_length(
    tok: &mut Tokenizer,
    path: &Path,
    max_length: usize,
    pad_id: Option<u32>,
) -> Result<()> {
    tok.with_truncation(Some(TruncationParams {
        max_length,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("tokenizer {}: {e}", path.display()))?;
    let padding = match pad_id {
        Some(pad_id) => {
            let pad_token = tok.id_to_token(pad_id).with_context(|| {
                format!("tokenizer {} has no pad token id {pad_id}", path.display())
            })?;
            Some(PaddingParams {
                strategy: PaddingStrategy::Fixed(max_length),
                pad_id,
                pad_token,
                ..Default::default()
            })
        }
        None => None,
    };
    tok.with_padding(padding);
    Ok(())
}

/// [`read_tokenizer`] then [`set_length`].
pub fn load_tokenizer(path: &Path, max_length: usize, pad_id: Option<u32>) -> Result<Tokenizer> {
    let mut tok = read_tokenizer(path)?;
    set_length(&mut tok, path, max_length, pad_id)?;
    Ok(tok)
}

/// Encodes one caption with special tokens; returns (ids, attention mask).
pub fn encode(tok: &Tokenizer, text: &str) -> Result<(Vec<u32>, Vec<u8>)> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
    let mask = enc.get_attention_mask().iter().map(|&m| m as u8).collect();
    Ok((enc.get_ids().to_vec(), mask))
}
