use std::process::{Command, Stdio};
use std::time::Duration;

use coatcheck_client::{Client, Status};
use coatcheck_testkit::TestServer;

use crate::client;

fn temp_journal() -> (std::path::PathBuf, impl Drop) {
    struct Rm(std::path::PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = std::env::temp_dir().join(format!("coatcheck-sdk-{}", uuid_like()));
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("pending.jsonl"), Rm(dir))
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test]
async fn submitted_ids_are_pending_until_their_outcome_is_read() {
    let s = TestServer::start().await;
    let (path, _rm) = temp_journal();
    let c = client(&s).with_journal(&path).unwrap();
    let a = c.submit("j", &1).correlation_id("a").send().await.unwrap();
    let b = c.submit("j", &2).send().await.unwrap();
    let pending = c.pending().unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].id.as_deref(), Some(a.id()));
    assert_eq!(pending[0].correlation_id.as_deref(), Some("a"));
    assert_eq!(pending[0].queue, "j");
    assert_eq!(pending[0].idempotency_key, a.idempotency_key);

    // A refused submit leaves nothing behind.
    assert!(c.submit("j", &3).max_attempts(0).send().await.is_err());
    assert_eq!(c.pending().unwrap().len(), 2);

    // Reading a terminal outcome forgets it.
    let job = c
        .claim(
            "j",
            coatcheck_client::wire::ClaimBody {
                worker_id: "w".into(),
                max: Some(1),
                lease: None,
                wait: None,
            },
        )
        .await
        .unwrap()
        .remove(0);
    assert_eq!(job.id, a.request.id);
    c.complete(&job.id, &job.lease_token, &"ok").await.unwrap();
    let out: String = c
        .wait_result(a.id(), Some(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(out, "ok");
    let pending = c.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id.as_deref(), Some(b.id()));
    drop(c);

    // A restarted client finds it; explicit forget removes it.
    let c = Client::builder(s.base_url())
        .journal(&path)
        .build()
        .unwrap();
    assert_eq!(c.pending().unwrap()[0].id.as_deref(), Some(b.id()));
    assert!(c.forget(b.id()).await.unwrap());
    assert!(!c.forget(b.id()).await.unwrap());
    assert!(c.pending().unwrap().is_empty());
}

/// The child half of `the_journal_survives_a_killed_client`: submits, says
/// so in a file, then hangs until killed.
#[tokio::test]
async fn journal_child_process() {
    let (Ok(url), Ok(path)) = (
        std::env::var("COATCHECK_SDK_CHILD_URL"),
        std::env::var("COATCHECK_SDK_CHILD_JOURNAL"),
    ) else {
        return;
    };
    let c = Client::builder(url).journal(&path).build().unwrap();
    let sub = c
        .submit("killed", &"payload")
        .correlation_id("before-the-kill")
        .send()
        .await
        .unwrap();
    std::fs::write(format!("{path}.submitted"), sub.id()).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn the_journal_survives_a_killed_client() {
    let s = TestServer::start().await;
    let (path, _rm) = temp_journal();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "journal::journal_child_process",
            "--test-threads=1",
        ])
        .env("COATCHECK_SDK_CHILD_URL", s.base_url())
        .env("COATCHECK_SDK_CHILD_JOURNAL", &path)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let marker = format!("{}.submitted", path.display());
    let mut id = None;
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(&marker) {
            if !text.is_empty() {
                id = Some(text);
                break;
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the child exited ({status}) without submitting");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap(); // SIGKILL: no destructors, no flushing
    child.wait().unwrap();
    let id = id.expect("the child submitted within 10 s");

    let c = client(&s).with_journal(&path).unwrap();
    let pending = c.pending().unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id.as_deref(), Some(id.as_str()));
    assert_eq!(
        pending[0].correlation_id.as_deref(),
        Some("before-the-kill")
    );
    // Resume waiting where the dead process left off.
    let job = c
        .claim(
            "killed",
            coatcheck_client::wire::ClaimBody {
                worker_id: "w".into(),
                max: Some(1),
                lease: None,
                wait: Some(2.0),
            },
        )
        .await
        .unwrap()
        .remove(0);
    c.complete(&job.id, &job.lease_token, &"after")
        .await
        .unwrap();
    let done = c.wait(&id, Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(done.status, Status::Succeeded);
    assert!(c.pending().unwrap().is_empty());
}
