//! One policy for a try at a replica that ended without a response, for both
//! HTTP paths (the lean HTTP/1.1 path and hyper's): another replica gets the
//! request, or the client gets 502 or 504. [`verdict`] decides; [`settle`]
//! also logs and counts, the same way on both paths.

use super::backend::{Backend, Pool};

/// Texts of the answers this policy gives.
pub(super) const NO_REPLICA_TEXT: &str = "no replica could take the request\n";
pub(super) const FAILED_TEXT: &str = "replica failed\n";
pub(super) const TIMEOUT_TEXT: &str = "replica did not answer in time\n";

/// How one try at a replica failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TryFailure {
    /// Nothing reached the replica (connection refused, a pooled connection
    /// found closed before a byte was written): another replica may take the
    /// request, body and all.
    NotSent(String),
    /// The replica got the request and failed before answering.
    Failed(String),
    /// No response head within `timeout`.
    Timeout,
}

/// What follows a failed try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Another replica gets the request.
    Retry,
    /// The client gets this answer.
    Answer {
        status: u16,
        reason: &'static str,
        text: &'static str,
    },
}

/// No replica (left) could take the request.
pub(super) const NO_REPLICA: Verdict = Verdict::Answer {
    status: 502,
    reason: "Bad Gateway",
    text: NO_REPLICA_TEXT,
};

/// The decision. `replayable`: the request can be sent again after a
/// replica got it (its whole body at hand, or none, and an idempotent
/// method); `take_retry`: the instance's retry budget, asked only for a
/// request that reached a replica.
pub(super) fn verdict(
    failure: &TryFailure,
    replayable: bool,
    take_retry: impl FnOnce() -> bool,
) -> Verdict {
    match failure {
        // nothing reached the replica: retrying cannot do anything twice
        TryFailure::NotSent(_) => Verdict::Retry,
        TryFailure::Failed(_) if replayable && take_retry() => Verdict::Retry,
        TryFailure::Failed(_) => Verdict::Answer {
            status: 502,
            reason: "Bad Gateway",
            text: FAILED_TEXT,
        },
        // the replica may still be working on it: not sent again
        TryFailure::Timeout => Verdict::Answer {
            status: 504,
            reason: "Gateway Timeout",
            text: TIMEOUT_TEXT,
        },
    }
}

/// Methods whose request may be sent twice (RFC 9110 idempotent methods,
/// less TRACE).
pub(super) fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "DELETE" | "PUT")
}

/// [`verdict`], logged and counted: a retry in
/// `flowgate_http_retries_total`, an answer in the replica's responses.
pub(super) fn settle(
    pool: &Pool,
    backend: &Backend,
    failure: &TryFailure,
    replayable: bool,
) -> Verdict {
    match failure {
        TryFailure::NotSent(cause) => {
            tracing::debug!(instance = %pool.instance, replica = %backend.label, %cause, "request not sent, trying another replica");
        }
        TryFailure::Failed(cause) => {
            tracing::warn!(instance = %pool.instance, replica = %backend.label, %cause, "replica failed the request");
        }
        TryFailure::Timeout => {}
    }
    let v = verdict(failure, replayable, || pool.take_retry());
    match v {
        Verdict::Retry => pool.retries.inc(),
        Verdict::Answer { status, .. } => backend.count(status),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_one_verdict() {
        let failed = TryFailure::Failed("reset".into());
        let not_sent = TryFailure::NotSent("refused".into());
        let status = |v: Verdict| match v {
            Verdict::Retry => 0,
            Verdict::Answer { status, .. } => status,
        };
        // (failure, replayable, budget left) -> 0 (retry) or the status
        let table = [
            (&not_sent, false, false, 0),
            (&not_sent, true, true, 0),
            (&failed, true, true, 0),
            (&failed, true, false, 502),
            (&failed, false, true, 502),
            (&TryFailure::Timeout, true, true, 504),
            (&TryFailure::Timeout, false, false, 504),
        ];
        for (f, replayable, budget, want) in table {
            assert_eq!(
                status(verdict(f, replayable, || budget)),
                want,
                "{f:?} replayable={replayable} budget={budget}"
            );
        }
    }

    #[test]
    fn the_budget_is_spent_only_on_a_retry_after_the_replica_got_the_request() {
        let mut asked = 0;
        let _ = verdict(&TryFailure::NotSent(String::new()), true, || {
            asked += 1;
            true
        });
        let _ = verdict(&TryFailure::Failed(String::new()), false, || {
            asked += 1;
            true
        });
        let _ = verdict(&TryFailure::Timeout, true, || {
            asked += 1;
            true
        });
        assert_eq!(asked, 0);
    }

    #[test]
    fn idempotent_methods_only() {
        for m in ["GET", "HEAD", "OPTIONS", "DELETE", "PUT"] {
            assert!(idempotent(m), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "TRACE", "get"] {
            assert!(!idempotent(m), "{m}");
        }
    }
}
