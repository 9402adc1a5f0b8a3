//! Threads of their own for the balancer's client connections, one
//! single-threaded runtime each (its own epoll, like nginx's worker
//! processes): a connection and the replica connections it uses stay on one
//! thread, woken by the kernel directly, never handed between threads. The
//! listeners accept on the main runtime and deal connections out in turn.
//!
//! A shard ends once every listener dropped its handle and its connections
//! are done; the app's task tracker tracks each connection, so shutdown waits
//! for them as before.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// The shard this thread runs, if it is one.
    static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard the calling thread runs (connections pooled per shard).
pub fn current() -> Option<usize> {
    SHARD.with(Cell::get)
}

/// The shard threads of one app.
pub struct Shards {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    next: AtomicUsize,
}

impl Shards {
    /// Starts `n` shard threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut senders = Vec::new();
        for index in 0..n.max(1) {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("flowgate-http-{index}"))
                .spawn(move || {
                    SHARD.with(|s| s.set(Some(index)));
                    runtime.block_on(async move {
                        let tasks = TaskTracker::new();
                        while let Some(job) = rx.recv().await {
                            tasks.spawn(job);
                        }
                        tasks.close();
                        tasks.wait().await;
                    });
                })?;
            senders.push(tx);
        }
        Ok(Self {
            senders,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `job` on the next shard in turn (tracked by `tracker`); on the
    /// caller's runtime if every shard has ended.
    pub fn run<F>(&self, tracker: &TaskTracker, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut job: Job = Box::pin(tracker.track_future(job));
        let n = self.senders.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match self.senders[(first + i) % n].send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => job = back,
            }
        }
        // every shard ended (shutdown): here, on the tracker (counted twice
        // while it runs, which changes nothing)
        tracker.spawn(job);
    }
}
