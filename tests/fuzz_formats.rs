//! Property-based tests of the parsers of multiclip's own formats and specs: the cache manifest,
//! the shards' safetensors headers and `multiclip` metadata, and the backbone, head and loss
//! specs. Arbitrary (or arbitrarily damaged) input gives `Ok` or `Err`, never a panic; a damaged
//! cache that still opens reads only finite values of the right shapes.
//!
//! Cases are bounded and the seed fixed, as in `fuzz_data.rs`; raise them from the environment to
//! hunt further, e.g. `PROPTEST_CASES=5000 PROPTEST_RNG_SEED=9 cargo test --test fuzz_formats`.

mod support;

use candle_core::Device;
use multiclip::backbone::source::parse_spec;
use multiclip::cache::manifest::Manifest;
use multiclip::cache::{CacheReader, Integrity, shard};
use multiclip::heads::HeadConfig;
use multiclip::loss::Loss;
use multiclip::spec::Spec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, contextualize_config};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use support::synthetic::Synthetic;

fn config(cases: u32) -> Config {
    contextualize_config(Config {
        cases,
        rng_seed: RngSeed::Fixed(3407),
        ..Config::default()
    })
}

/// Text made mostly of the spec grammar's own characters (so the parser's branches are reached),
/// or anything.
fn spec_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_0-9:=,+\". \\-]{0,40}",
        "(mlp|gat|router|ml_decoder|ensemble|bce|focal|smoothing|asl|zlpr|angular|margin)(:[a-z_]{1,8}=[0-9a-z.+\"\\-]{0,6}(,[a-z_]{1,8}=[0-9a-z.+\\-]{0,6}){0,3})?",
        "(clip|blip|dinov2|sentence):[a-z/.\"]{0,12}(:[a-z_]{1,12}=[a-z{}\" ,]{0,12})?(\\+(dinov2|sentence):[a-z/]{1,8}){0,2}",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn spec_parsers_never_panic(text in spec_text()) {
        let _ = Spec::parse(&text);
        let _ = Spec::parse_located(&text);
        let _ = parse_spec(&text);
        let _ = text.parse::<HeadConfig>().map(|head| head.validate());
        if let Ok(loss) = text.parse::<Loss>() {
            let _ = loss.validate();
            // A loss's spec form parses back to the same loss.
            let again: Loss = loss.to_string().parse().unwrap();
            prop_assert_eq!(again, loss);
        }
    }
}

/// A small cache (3 shards, pooled outputs and a token sequence with its mask) written once: its
/// manifest and its first shard, as bytes, and its folder.
struct Pristine {
    dir: PathBuf,
    manifest: Vec<u8>,
    shard: Vec<u8>,
    header_end: usize,
}

fn pristine() -> &'static Pristine {
    static PRISTINE: OnceLock<(tempfile::TempDir, Pristine)> = OnceLock::new();
    &PRISTINE
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let spec = Synthetic {
                rows: 12,
                dim: 4,
                tokens: Some((3, 1..3)),
                labels: 3,
                seed: 1,
                shard_rows: 5,
                backbone: "synthetic:fuzz".into(),
            };
            let data = tmp.path().join("data");
            let dir = tmp.path().join("cache");
            spec.write_dataset(&data).unwrap();
            spec.write_cache(&data, &dir).unwrap();
            let shard = std::fs::read(dir.join("shard-00000.safetensors")).unwrap();
            let header_end = 8 + u64::from_le_bytes(shard[..8].try_into().unwrap()) as usize;
            let pristine = Pristine {
                manifest: std::fs::read(dir.join("manifest.json")).unwrap(),
                shard,
                header_end,
                dir,
            };
            (tmp, pristine)
        })
        .1
}

/// Byte edits `(in the hot part?, position, byte)` and an optional cut, applied by [`damaged`].
fn damage() -> impl Strategy<Value = (Vec<(bool, usize, u8)>, Option<usize>)> {
    (
        prop::collection::vec(
            (prop::bool::weighted(0.8), any::<usize>(), any::<u8>()),
            1..8,
        ),
        prop::option::weighted(0.2, any::<usize>()),
    )
}

/// `bytes` with `edits` applied (an edit in the hot part lands in the first `hot` bytes: a
/// header, where the parsing is) and then cut.
fn damaged(bytes: &[u8], hot: usize, edits: &[(bool, usize, u8)], cut: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for &(in_hot, at, byte) in edits {
        let at = if in_hot {
            at % hot.min(out.len()).max(1)
        } else {
            at % out.len().max(1)
        };
        if let Some(b) = out.get_mut(at) {
            *b = byte;
        }
    }
    if let Some(cut) = cut {
        out.truncate(cut % (out.len() + 1));
    }
    out
}

/// A copy of the pristine cache in a new folder with `manifest` and the first shard replaced.
fn cache_with(manifest: &[u8], shard: &[u8]) -> tempfile::TempDir {
    let p = pristine();
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&p.dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    std::fs::write(tmp.path().join("manifest.json"), manifest).unwrap();
    std::fs::write(tmp.path().join("shard-00000.safetensors"), shard).unwrap();
    tmp
}

/// Opens `dir` both ways; whatever opens must read finite rows of the recorded shapes.
fn open_and_read(dir: &Path) {
    for integrity in [Integrity::Full, Integrity::Headers] {
        let Ok(reader) = CacheReader::open_with(dir, integrity) else {
            continue;
        };
        let rows: Vec<usize> = (0..reader.len()).collect();
        for output in reader.outputs().to_vec() {
            if let Ok(t) = reader.gather(&output.name, &rows, &Device::Cpu) {
                assert_eq!(t.dims()[0], rows.len());
                assert_eq!(&t.dims()[1..], output.shape.as_slice());
                let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                assert!(values.iter().all(|v| v.is_finite()), "{}", output.name);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn a_damaged_manifest_is_an_error_never_a_panic((edits, cut) in damage()) {
        let p = pristine();
        let manifest = damaged(&p.manifest, p.manifest.len(), &edits, cut);
        let cache = cache_with(&manifest, &p.shard);
        let _ = Manifest::load(&cache.path().join("manifest.json"));
        open_and_read(cache.path());
    }

    #[test]
    fn a_damaged_shard_is_an_error_never_a_panic((edits, cut) in damage()) {
        let p = pristine();
        let shard_bytes = damaged(&p.shard, p.header_end, &edits, cut);
        let cache = cache_with(&p.manifest, &shard_bytes);
        let _ = shard::read_meta(&cache.path().join("shard-00000.safetensors"));
        let _ = shard::header_len(&shard_bytes);
        open_and_read(cache.path());
    }
}

/// The pristine cache itself opens and reads (so the properties above start from a good cache).
#[test]
fn the_pristine_cache_opens() {
    let p = pristine();
    let reader = CacheReader::open(&p.dir).unwrap();
    assert_eq!(reader.len(), 12);
    open_and_read(&p.dir);
}
