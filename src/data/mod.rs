//! Datasets in the competition format: the csv records, the label vocabulary, the train/validation
//! split and image decoding.
