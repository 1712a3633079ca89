//! What a k-fold run records in its sidecars (the ensemble's and each member's): K, the seed, the
//! rows folded and, for a member, its fold. `train::kfold` makes the folds.

use serde::{Deserialize, Serialize};

/// Which rows of the split file the folds cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FoldRows {
    /// The training and validation ids.
    All,
    /// The training ids; the validation ids measure the ensemble.
    Train,
}

impl FoldRows {
    pub const ALL: [FoldRows; 2] = [Self::All, Self::Train];

    /// `all` or `train`, as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Train => "train",
        }
    }
}

/// The folds of a k-fold ensemble, recorded in its sidecar and its members'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldRef {
    /// K.
    pub count: usize,
    pub seed: u64,
    pub rows: FoldRows,
    /// The 1-based fold a member was validated on (absent for the ensemble).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
}

impl FoldRef {
    /// Whether some member trained on the split's validation ids.
    pub fn trained_on_validation_ids(&self) -> bool {
        self.rows == FoldRows::All
    }
}
