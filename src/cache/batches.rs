//! Batch iteration over a subset of cache rows (e.g. the training ids of a split), in order or
//! shuffled per (seed, epoch), for any batch size, crossing shard boundaries freely. Only one
//! batch is ever materialised: memory is bounded by the batch size, never by the cache.

use super::reader::CacheReader;
use anyhow::{Result, ensure};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// The order in which a [`BatchPlan`] visits its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchOrder {
    /// The rows in the order given.
    Sequential,
    /// A permutation that depends only on (`seed`, `epoch`): each epoch gets its own ChaCha8
    /// stream of the seed, so epoch `e` is reproducible without replaying epochs `0..e`.
    Shuffled { seed: u64, epoch: u64 },
}

/// Splits a list of reader rows into batches of row numbers. The last batch may be smaller.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    rows: Vec<usize>,
    batch_size: usize,
    next: usize,
}

impl BatchPlan {
    pub fn new(rows: &[usize], batch_size: usize, order: BatchOrder) -> Result<Self> {
        ensure!(batch_size > 0, "batch size must be at least 1");
        let mut rows = rows.to_vec();
        if let BatchOrder::Shuffled { seed, epoch } = order {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(epoch);
            rows.shuffle(&mut rng);
        }
        Ok(Self {
            rows,
            batch_size,
            next: 0,
        })
    }
}

impl Iterator for BatchPlan {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.next >= self.rows.len() {
            return None;
        }
        let end = (self.next + self.batch_size).min(self.rows.len());
        let batch = self.rows[self.next..end].to_vec();
        self.next = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.rows.len() - self.next).div_ceil(self.batch_size);
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchPlan {}

/// One gathered batch: the reader rows and one f32 tensor per requested output.
#[derive(Debug)]
pub struct Batch {
    pub rows: Vec<usize>,
    /// (output name, `[rows.len(), ...shape]` tensor), in the order requested.
    pub tensors: Vec<(String, Tensor)>,
}

impl Batch {
    /// The tensor of output `name`, if it was requested.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// Iterator of gathered [`Batch`]es; see [`CacheReader::batches`].
pub struct Batches<'a> {
    reader: &'a CacheReader,
    plan: BatchPlan,
    outputs: Vec<String>,
    device: Device,
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let rows = self.plan.next()?;
        let tensors = self
            .outputs
            .iter()
            .map(|name| Ok((name.clone(), self.reader.gather(name, &rows, &self.device)?)))
            .collect::<Result<Vec<_>>>();
        Some(tensors.map(|tensors| Batch { rows, tensors }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.plan.size_hint()
    }
}

impl CacheReader {
    /// Batches of `batch_size` over `rows` (reader row numbers, e.g. from
    /// [`CacheReader::index_of`]) in `order`, each gathering `outputs` onto `device`.
    /// Unknown output names and out-of-range rows are errors here, before any batch is read.
    pub fn batches(
        &self,
        rows: &[usize],
        batch_size: usize,
        order: BatchOrder,
        outputs: &[&str],
        device: &Device,
    ) -> Result<Batches<'_>> {
        for name in outputs {
            self.output_spec(name)?;
        }
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.len()) {
            anyhow::bail!(
                "row {bad} is out of range: cache {} has {} rows",
                self.dir().display(),
                self.len()
            );
        }
        Ok(Batches {
            reader: self,
            plan: BatchPlan::new(rows, batch_size, order)?,
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            device: device.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::WorkerSlot;
    use crate::cache::manifest::tests::test_header;
    use crate::cache::writer::tests::write_synthetic;

    #[test]
    fn plan_covers_every_row_once_in_any_order() {
        let rows: Vec<usize> = (0..103).collect();
        let seq: Vec<Vec<usize>> = BatchPlan::new(&rows, 10, BatchOrder::Sequential)
            .unwrap()
            .collect();
        assert_eq!(seq.len(), 11);
        assert_eq!(seq.concat(), rows);
        let order = BatchOrder::Shuffled {
            seed: 3407,
            epoch: 0,
        };
        let a: Vec<usize> = BatchPlan::new(&rows, 32, order)
            .unwrap()
            .flatten()
            .collect();
        let b: Vec<usize> = BatchPlan::new(&rows, 7, order).unwrap().flatten().collect();
        assert_eq!(a, b, "the permutation does not depend on the batch size");
        assert_ne!(a, rows);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, rows);
        let next_epoch: Vec<usize> = BatchPlan::new(
            &rows,
            32,
            BatchOrder::Shuffled {
                seed: 3407,
                epoch: 1,
            },
        )
        .unwrap()
        .flatten()
        .collect();
        assert_ne!(a, next_epoch);
        assert!(BatchPlan::new(&rows, 0, BatchOrder::Sequential).is_err());
    }

    #[test]
    fn batches_gather_a_subset_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let header = test_header(50, 8);
        write_synthetic(dir.path(), &header, WorkerSlot::SINGLE, &[], None)
            .finish()
            .unwrap();
        let reader = CacheReader::open(dir.path()).unwrap();
        let subset: Vec<usize> = (0..50).filter(|r| r % 3 != 0).collect();
        let order = BatchOrder::Shuffled { seed: 1, epoch: 2 };
        let mut seen = Vec::new();
        for batch in reader
            .batches(&subset, 16, order, &["image", "mask"], &Device::Cpu)
            .unwrap()
        {
            let batch = batch.unwrap();
            let image = batch.get("image").unwrap().to_vec2::<f32>().unwrap();
            for (row, values) in batch.rows.iter().zip(image) {
                assert_eq!(values[0], *row as f32);
            }
            assert_eq!(batch.get("mask").unwrap().dims(), &[batch.rows.len(), 2]);
            seen.extend(batch.rows);
        }
        seen.sort();
        assert_eq!(seen, subset);
        assert!(
            reader
                .batches(&subset, 16, order, &["nope"], &Device::Cpu)
                .is_err()
        );
        assert!(
            reader
                .batches(&[50], 16, order, &["image"], &Device::Cpu)
                .is_err()
        );
    }
}
