//! A local SQS queue and the Lambda event source mapping that reads it: batches of up to
//! `batch_size` (waiting at most `window` to fill one), the function invoked with the SQS
//! event as JSON, the messages it reports as batch item failures delivered again, and after
//! [`MAX_RECEIVES`] deliveries dead-lettered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use fleet_shared::time;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::functions::{FunctionError, Functions};
use crate::stats::Stats;

/// Deliveries of one message before it goes to the dead-letter queue (the template's maxReceiveCount).
pub const MAX_RECEIVES: u32 = 5;

/// One message waiting in a local queue.
struct Queued {
    id: String,
    body: String,
    sent_ms: i64,
    receives: u32,
}

/// The sending side of a local queue.
#[derive(Clone)]
pub struct QueueSender {
    tx: mpsc::UnboundedSender<Queued>,
    /// Message ids are `<start time>-<n>`: unique across restarts of the local IoT Core.
    id_prefix: Arc<str>,
    next_id: Arc<AtomicU64>,
}

impl QueueSender {
    pub fn send(&self, body: String, now_ms: i64) {
        let id = format!("{}-{}", self.id_prefix, self.next_id.fetch_add(1, Relaxed) + 1);
        let _ = self.tx.send(Queued { id, body, sent_ms: now_ms, receives: 0 });
    }
}

pub struct QueueConfig {
    pub function: String,
    pub batch_size: usize,
    pub window: Duration,
}

/// Start a queue and its consumer. The consumer returns once `draining` is set and the queue is
/// empty (every message handled or dead-lettered).
pub fn spawn(
    config: QueueConfig,
    functions: Arc<Functions>,
    stats: Arc<Stats>,
    draining: watch::Receiver<bool>,
) -> (QueueSender, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let sender = QueueSender {
        tx: tx.clone(),
        id_prefix: format!("{:x}", time::now_ms()).into(),
        next_id: Arc::new(AtomicU64::new(0)),
    };
    let consumer = Consumer { config, requeue: tx, functions, stats };
    (sender, tokio::spawn(consumer.run(rx, draining)))
}

struct Consumer {
    config: QueueConfig,
    requeue: mpsc::UnboundedSender<Queued>,
    functions: Arc<Functions>,
    stats: Arc<Stats>,
}

impl Consumer {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Queued>, mut draining: watch::Receiver<bool>) {
        loop {
            let first = tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = draining.wait_for(|d| *d) => {
                    if rx.is_empty() {
                        return;
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.window;
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            self.deliver(batch).await;
        }
    }

    async fn deliver(&self, batch: Vec<Queued>) {
        let mut event = SqsEvent::default();
        event.records = batch
            .iter()
            .map(|q| {
                let mut m = SqsMessage::default();
                m.message_id = Some(q.id.clone());
                m.body = Some(q.body.clone());
                m.attributes.insert("SentTimestamp".into(), q.sent_ms.to_string());
                m.attributes.insert("ApproximateReceiveCount".into(), (q.receives + 1).to_string());
                m.event_source = Some("aws:sqs".into());
                m
            })
            .collect();
        let failed: HashSet<String> = match self.invoke(&event).await {
            Ok(r) => r.batch_item_failures.into_iter().map(|f| f.item_identifier).collect(),
            Err(e) => {
                // The whole invocation failed: SQS delivers every message again.
                warn!(function = self.config.function, error = %e, "queue batch invocation failed");
                batch.iter().map(|q| q.id.clone()).collect()
            }
        };
        let now = time::now_ms();
        let mut latencies = Vec::with_capacity(batch.len());
        for q in batch {
            if !failed.contains(&q.id) {
                self.stats.delivered.fetch_add(1, Relaxed);
                latencies.push((now - q.sent_ms).max(0) as u32);
            } else if q.receives + 1 >= MAX_RECEIVES {
                warn!(message = q.id, "message failed {MAX_RECEIVES} times: dead-lettered");
                self.stats.dead_lettered.fetch_add(1, Relaxed);
            } else {
                self.stats.retried.fetch_add(1, Relaxed);
                let _ = self.requeue.send(Queued { receives: q.receives + 1, ..q });
            }
        }
        self.stats.record_latencies(latencies, now);
    }

    /// One SQS batch through the function's own entry point, as JSON in and out.
    async fn invoke(&self, event: &SqsEvent) -> Result<SqsBatchResponse, FunctionError> {
        let response = self.functions.invoke(&self.config.function, event).await?;
        serde_json::from_value(response).map_err(|e| {
            FunctionError::new("InvalidBatchResponse", format!("not an SQS batch response: {e}"))
        })
    }
}
