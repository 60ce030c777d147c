//! Work too long for an async worker, moved to tokio's blocking pool: a scan
//! of a big index (a query no key lookup answers), a snapshot write or an
//! expiry tick would otherwise hold the worker, and every connection queued
//! on it, for as long as it runs. With two workers and a million keys, one
//! `GET /index` scan made a TCP round trip wait 207 ms (BENCHMARKS.md,
//! "Queries off the async workers").

/// Runs `work` on a blocking thread and waits for it. A panic in `work`
/// resumes in the caller; `None` only when the runtime shut down before
/// `work` could start.
pub async fn off_workers<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => Some(done),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => None,
    }
}

/// What a query's asker hears when the server shut down before its scan ran.
pub const SHUTTING_DOWN: &str = "vigil is shutting down";

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_on_another_thread_and_returns_its_result() {
        let caller = std::thread::current().id();
        let (ran_on, sum) = off_workers(|| (std::thread::current().id(), 2 + 2))
            .await
            .expect("the runtime is running");
        assert_ne!(ran_on, caller);
        assert_eq!(sum, 4);
    }

    #[tokio::test]
    #[should_panic(expected = "scan failed")]
    async fn a_panic_resumes_in_the_caller() {
        off_workers(|| panic!("scan failed")).await;
    }
}
