//! A local SQS queue and the Lambda event source mapping that reads it: batches of up to
//! `batch_size` (waiting at most `window` to fill one), up to `concurrency` batches in flight
//! at once (Lambda runs several pollers; order across batches is not kept, as in SQS), the
//! function invoked with the SQS event as JSON, the messages it reports as batch item failures
//! delivered again, and after [`MAX_RECEIVES`] deliveries dead-lettered.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use fleet_shared::time;
use tokio::sync::{mpsc, watch, Semaphore};
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
    /// Batches in flight at once (at least 1).
    pub concurrency: usize,
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
    let consumer = Arc::new(Consumer { config, requeue: tx, functions, stats });
    (sender, tokio::spawn(consumer.run(rx, draining)))
}

struct Consumer {
    config: QueueConfig,
    requeue: mpsc::UnboundedSender<Queued>,
    functions: Arc<Functions>,
    stats: Arc<Stats>,
}

impl Consumer {
    async fn run(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Queued>,
        mut draining: watch::Receiver<bool>,
    ) {
        let slots = self.config.concurrency.max(1);
        let in_flight = Arc::new(Semaphore::new(slots));
        loop {
            let next = tokio::select! {
                m = rx.recv() => match m { Some(m) => Some(m), None => return },
                _ = draining.wait_for(|d| *d) => None,
            };
            let Some(first) = next else {
                // Draining. Batches still in flight may put failed messages back: wait for them.
                drop(in_flight.acquire_many(slots as u32).await);
                if rx.is_empty() {
                    return;
                }
                continue;
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.window;
            while batch.len() < self.config.batch_size {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let Ok(slot) = Arc::clone(&in_flight).acquire_owned().await else { return };
            let consumer = Arc::clone(&self);
            tokio::spawn(async move {
                consumer.deliver(batch).await;
                drop(slot);
            });
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
        let invoked = std::time::Instant::now();
        let result = self.invoke(&event).await;
        tracing::debug!(
            function = self.config.function,
            messages = batch.len(),
            ms = invoked.elapsed().as_millis() as u64,
            "batch delivered"
        );
        let failed: HashSet<String> = match result {
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

    /// One SQS batch through the function's own entry point, as JSON in and out (a panic in
    /// the function is an error, so the batch is delivered again).
    async fn invoke(&self, event: &SqsEvent) -> Result<SqsBatchResponse, FunctionError> {
        let response = self.functions.invoke(&self.config.function, event).await?;
        serde_json::from_value(response).map_err(|e| {
            FunctionError::new("InvalidBatchResponse", format!("not an SQS batch response: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::Invocation;

    /// A function that fails every message on its first delivery and takes 20 ms per batch.
    fn fails_first_delivery(event: Box<serde_json::value::RawValue>) -> Invocation {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let event: SqsEvent =
                serde_json::from_str(event.get()).map_err(|e| FunctionError::new("Bad", e.to_string()))?;
            let first: Vec<&str> = event
                .records
                .iter()
                .filter(|m| m.attributes.get("ApproximateReceiveCount").map(String::as_str) == Some("1"))
                .filter_map(|m| m.message_id.as_deref())
                .collect();
            serde_json::to_value(fleet_shared::lambda::batch_response(first))
                .map_err(|e| FunctionError::new("Bad", e.to_string()))
        })
    }

    /// Run `messages` through a queue read by `function`, drain it, and return the counters.
    async fn drain(
        function: impl crate::functions::LocalFunction + 'static,
        batch_size: usize,
        concurrency: usize,
        messages: usize,
    ) -> crate::stats::Snapshot {
        let mut functions = Functions::default();
        functions.add("F", function);
        let stats = Arc::new(Stats::default());
        let (drain, draining) = watch::channel(false);
        let config =
            QueueConfig { function: "F".into(), batch_size, window: Duration::from_millis(1), concurrency };
        let (queue, consumer) = spawn(config, Arc::new(functions), Arc::clone(&stats), draining);
        for i in 0..messages {
            queue.send(format!("{{\"n\":{i}}}"), 0);
        }
        let _ = drain.send(true);
        tokio::time::timeout(Duration::from_secs(10), consumer).await.expect("drains").expect("no panic");
        stats.snapshot(0)
    }

    #[tokio::test]
    async fn draining_waits_for_batches_in_flight_and_what_they_put_back() {
        let s = drain(fails_first_delivery, 3, 2, 20).await;
        assert_eq!((s.delivered, s.retried, s.dead_lettered), (20, 20, 0), "{s:?}");
    }

    #[tokio::test]
    async fn a_panicking_function_gets_its_batch_again_and_then_dead_letters_it() {
        let panics =
            |_: Box<serde_json::value::RawValue>| -> Invocation { Box::pin(async { panic!("bug") }) };
        let s = drain(panics, 10, 1, 1).await;
        assert_eq!((s.delivered, s.retried, s.dead_lettered), (0, MAX_RECEIVES as u64 - 1, 1), "{s:?}");
    }
}
