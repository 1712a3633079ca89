//! Dynamic batching: decoded samples wait in a bounded queue; one dedicated thread takes the
//! first, gathers more until `max_batch` or until the first has waited `max_wait`, and runs them
//! through the classifier in one forward pass. A full queue refuses at once (the caller answers
//! 503), so memory is bounded by the queue. A sample whose client has gone is dropped before the
//! forward. If a batch fails, its samples are retried one by one, so that one bad sample fails
//! only its own request.

use super::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use multiclip::backbone::Sample;
use multiclip::classify::Classifier;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One sample's probabilities and the labels they choose, in vocabulary order.
pub struct Answer {
    pub probabilities: Vec<f32>,
    pub decisions: Vec<bool>,
}

/// A sample's answer, or why it could not be computed.
pub type Reply = Result<Answer, String>;

struct Job {
    sample: Sample,
    enqueued: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The queue in front of the forward thread.
pub struct Batcher {
    sender: Sender<Job>,
    metrics: Arc<Metrics>,
}

/// How batches are formed.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_wait: Duration,
    /// Samples that may wait.
    pub queue: usize,
    /// Every sample gets at least its label closest to its threshold.
    pub at_least_one: bool,
}

impl Batcher {
    /// Starts the forward thread, which owns `classifier` and ends when the batcher is dropped
    /// (after answering what was queued).
    pub fn start(
        classifier: Classifier,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded(policy.queue.max(1));
        let thread_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("forward".into())
            .spawn(move || run(&classifier, &receiver, policy, &thread_metrics))?;
        Ok(Self { sender, metrics })
    }

    /// Queues `sample`; `None` when the queue is full.
    pub fn submit(&self, sample: Sample) -> Option<oneshot::Receiver<Reply>> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            sample,
            enqueued: Instant::now(),
            reply,
        };
        let sent = match self.sender.try_send(job) {
            Ok(()) => Some(answer),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        };
        self.metrics.set_queue_depth(self.sender.len());
        sent
    }
}

/// The forward thread's loop: gather a batch, compute it, answer; until the queue closes.
fn run(classifier: &Classifier, queue: &Receiver<Job>, policy: BatchPolicy, metrics: &Metrics) {
    while let Ok(first) = queue.recv() {
        let deadline = first.enqueued + policy.max_wait;
        let mut jobs = vec![first];
        while jobs.len() < policy.max_batch.max(1) {
            match queue.recv_deadline(deadline) {
                Ok(job) => jobs.push(job),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        metrics.set_queue_depth(queue.len());
        jobs.retain(|job| !job.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        let (samples, replies): (Vec<Sample>, Vec<_>) =
            jobs.into_iter().map(|job| (job.sample, job.reply)).unzip();
        let start = Instant::now();
        match forward(classifier, &samples, policy.at_least_one) {
            Ok(rows) => {
                metrics.batch(samples.len(), start.elapsed());
                for (reply, row) in replies.into_iter().zip(rows) {
                    let _ = reply.send(Ok(row));
                }
            }
            Err(error) if samples.len() == 1 => {
                let _ = replies.into_iter().next().map(|r| r.send(Err(error)));
            }
            Err(_) => {
                // One sample may be the cause: each alone gets its own answer.
                for (sample, reply) in samples.iter().zip(replies) {
                    let start = Instant::now();
                    let one = forward(
                        classifier,
                        std::slice::from_ref(sample),
                        policy.at_least_one,
                    );
                    if one.is_ok() {
                        metrics.batch(1, start.elapsed());
                    }
                    let _ = reply
                        .send(one.and_then(|mut rows| rows.pop().ok_or_else(|| "no row".into())));
                }
            }
        }
    }
}

/// Per sample, its probabilities and chosen labels, from one forward pass. A panic is a bug,
/// never expected from any input; it is caught here only so that the thread keeps serving the
/// other requests.
fn forward(
    classifier: &Classifier,
    samples: &[Sample],
    at_least_one: bool,
) -> Result<Vec<Answer>, String> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let probabilities = classifier.classify(samples)?;
        let decisions = classifier.decisions(&probabilities, at_least_one);
        let k = classifier.card().labels.len().max(1);
        anyhow::Ok(
            probabilities
                .chunks(k)
                .zip(decisions.chunks(k))
                .map(|(p, d)| Answer {
                    probabilities: p.to_vec(),
                    decisions: d.to_vec(),
                })
                .collect::<Vec<_>>(),
        )
    }));
    match result {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(error)) => Err(format!("{error:#}")),
        Err(_) => Err("internal error: the forward pass panicked (a bug: please report it)".into()),
    }
}
