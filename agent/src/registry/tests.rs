//! Lifecycle unit tests without root: stub instances (no process, no
//! files) moved through their phases by hand, and the registry's races
//! played out in both orders. Paused time stands in for the backoffs.

use super::*;
use crate::phase::Phase;
use crate::queue::{self, QueueError};
use std::sync::atomic::AtomicUsize;
use tokio::sync::Semaphore;

fn client(n: u32) -> Client {
    Client::new(format!("uid={n}"), format!("uid={n} pid=? cgroup=/test"))
}

fn stub(id: &str, client: Option<&Client>) -> Arc<Instance> {
    Instance::new(id.into(), std::env::temp_dir().join("berth-registry-test").join(id), client)
}

/// `attach` without a slot: join or claim only.
fn join(reg: &Registry, c: &Client) -> Attach {
    reg.attach(c, false, None::<fn() -> Arc<Instance>>)
}

fn kind(a: &Attach) -> &'static str {
    match a {
        Attach::Joined(_) => "joined",
        Attach::Claimed(_) => "claimed",
        Attach::Created(_) => "created",
        Attach::Empty => "empty",
        Attach::Draining => "draining",
    }
}

#[tokio::test(start_paused = true)]
async fn warm_claim_before_the_unclaimed_end_serves_the_client() {
    let reg = Registry::new(Duration::ZERO);
    let warm = stub("w1", None);
    reg.add_warm(warm.clone());
    warm.mark_ready();
    assert!(matches!(*warm.phase.borrow(), Phase::WarmIdle));

    let a = join(&reg, &client(1));
    assert_eq!(kind(&a), "claimed");
    assert!(Arc::ptr_eq(a.instance().unwrap(), &warm));
    // The claim made it Ready at once, for the connection waiting on it.
    assert!(matches!(*warm.phase.borrow(), Phase::Ready));
    assert_eq!(warm.client(), client(1));
    assert_eq!(*warm.conns.borrow(), 1);
    // The drain (or a dead daemon) comes second: the instance serves on.
    assert!(!reg.end_unclaimed(&warm), "a claimed instance does not end unclaimed");
    assert_eq!(warm.client(), client(1));
    assert_eq!(reg.warm_len(), 0);
    // The client's next connection joins the same instance.
    let b = join(&reg, &client(1));
    assert_eq!(kind(&b), "joined");
    assert_eq!(*warm.conns.borrow(), 2);
}

#[tokio::test(start_paused = true)]
async fn unclaimed_end_before_the_claim_leaves_the_client_without() {
    let reg = Registry::new(Duration::ZERO);
    let warm = stub("w2", None);
    reg.add_warm(warm.clone());
    warm.mark_ready();

    assert!(reg.end_unclaimed(&warm), "an unclaimed instance ends");
    assert_eq!(reg.warm_len(), 0);
    // The client finds no warm instance and must take a slot.
    assert_eq!(kind(&join(&reg, &client(2))), "empty");
    assert!(!warm.claim(&client(2)), "a retired instance cannot be claimed");
    assert_eq!(*warm.conns.borrow(), 0);
    assert!(matches!(*warm.phase.borrow(), Phase::WarmIdle), "not handed out as Ready");
}

#[tokio::test(start_paused = true)]
async fn a_claim_while_starting_becomes_ready_not_warm_idle() {
    let reg = Registry::new(Duration::ZERO);
    let warm = stub("w3", None);
    reg.add_warm(warm.clone());
    assert_eq!(kind(&join(&reg, &client(3))), "claimed");
    assert!(matches!(*warm.phase.borrow(), Phase::Starting));
    warm.mark_ready();
    assert!(matches!(*warm.phase.borrow(), Phase::Ready));
    // Failed or ended warm instances are skipped, not handed out.
    let dead = stub("w4", None);
    dead.set_phase(Phase::Ending { note: None });
    reg.add_warm(dead);
    assert_eq!(kind(&join(&reg, &client(4))), "empty");
}

#[tokio::test(start_paused = true)]
async fn a_claimed_sandbox_starts_its_daemon_and_is_never_handed_out_as_ready() {
    let reg = Registry::new(Duration::ZERO);
    let dir = std::env::temp_dir().join("berth-registry-test");
    // Held, then claimed: `Starting` (the daemon execs now), not `Ready`.
    let sb = Instance::sandbox("s1".into(), dir.join("s1"));
    assert!(sb.warm && sb.held);
    reg.add_warm(sb.clone());
    sb.mark_held();
    assert!(matches!(*sb.phase.borrow(), Phase::WarmIdle));
    assert_eq!(kind(&join(&reg, &client(5))), "claimed");
    assert!(matches!(*sb.phase.borrow(), Phase::Starting), "a claimed sandbox waits for its daemon");
    sb.mark_ready();
    assert!(matches!(*sb.phase.borrow(), Phase::Ready));
    // Claimed while still being made: held keeps it `Starting`.
    let sb2 = Instance::sandbox("s2".into(), dir.join("s2"));
    reg.add_warm(sb2.clone());
    assert_eq!(kind(&join(&reg, &client(6))), "claimed");
    sb2.mark_held();
    assert!(matches!(*sb2.phase.borrow(), Phase::Starting), "not WarmIdle: its client waits on it");
}

#[tokio::test(start_paused = true)]
async fn a_join_before_the_reap_keeps_the_instance() {
    let reg = Registry::new(Duration::ZERO);
    let c = client(5);
    let inst = stub("i5", Some(&c));
    let a = reg.attach(&c, false, Some(|| inst.clone()));
    assert_eq!(kind(&a), "created");
    inst.mark_ready();
    inst.conns.send_modify(|n| *n -= 1); // its first connection closed
                                         // A new connection joins, then the idle reaper looks: it must not end it.
    assert_eq!(kind(&join(&reg, &c)), "joined");
    assert!(!reg.unregister(&inst, false), "the reaper leaves an instance in use");
    assert!(reg.get(&c.key).is_some_and(|i| Arc::ptr_eq(&i, &inst)));
    // A forced end (daemon died, unpublished) takes it anyway.
    assert!(reg.unregister(&inst, true));
    assert!(reg.get(&c.key).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_reap_before_the_join_sends_the_client_to_a_fresh_instance() {
    let reg = Registry::new(Duration::ZERO);
    let c = client(6);
    let old = stub("i6", Some(&c));
    let _ = reg.attach(&c, false, Some(|| old.clone()));
    old.conns.send_modify(|n| *n -= 1);
    assert!(reg.unregister(&old, false), "idle: the reaper ends it");
    // The connection that comes after gets no dying instance.
    assert_eq!(kind(&join(&reg, &c)), "empty");
    let fresh = stub("i6b", Some(&c));
    let a = reg.attach(&c, false, Some(|| fresh.clone()));
    assert_eq!(kind(&a), "created");
    assert!(Arc::ptr_eq(a.instance().unwrap(), &fresh));
    // The old instance's late unregister does not remove the fresh one.
    assert!(reg.unregister(&old, true));
    assert!(reg.get(&c.key).is_some_and(|i| Arc::ptr_eq(&i, &fresh)));
}

#[tokio::test(start_paused = true)]
async fn draining_refuses_new_clients_but_joins_running_ones() {
    let reg = Registry::new(Duration::ZERO);
    let c = client(7);
    let inst = stub("i7", Some(&c));
    let _ = reg.attach(&c, false, Some(|| inst.clone()));
    assert_eq!(kind(&reg.attach(&c, true, None::<fn() -> Arc<Instance>>)), "joined");
    let other = stub("i8", Some(&client(8)));
    assert_eq!(kind(&reg.attach(&client(8), true, Some(|| other.clone()))), "draining");
}

#[tokio::test(start_paused = true)]
async fn a_start_failure_is_answered_from_the_cache_until_the_backoff_ends() {
    let reg = Registry::new(Duration::from_secs(10));
    let c = client(9);
    let e = AdmitError::StartFailed {
        id: "x".into(),
        client: c.display.clone(),
        reason: "exit 1".into(),
        tail: "boom".into(),
    };
    assert!(reg.recent_failure(&c).is_none());
    reg.note_failure(&c, &e);
    let hit = reg.recent_failure(&c).expect("a hit within the backoff");
    assert!(hit.to_string().contains("boom"), "{hit}");
    assert!(reg.recent_failure(&client(10)).is_none(), "other clients are not refused");
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(reg.recent_failure(&c).is_some());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(reg.recent_failure(&c).is_none(), "the backoff is over");
    // With no backoff, nothing is cached.
    let off = Registry::new(Duration::ZERO);
    off.note_failure(&c, &e);
    assert!(off.recent_failure(&c).is_none());
}

#[tokio::test(start_paused = true)]
async fn the_warm_pool_rests_after_a_failed_start() {
    let reg = Registry::new(Duration::ZERO);
    assert!(reg.warm_resting().is_none());
    reg.warm_failed(Duration::from_secs(5));
    assert!(reg.warm_resting().is_some());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(reg.warm_resting().is_none());
}

#[tokio::test(start_paused = true)]
async fn phases_carry_the_end_note_and_the_failure_past_the_wipe() {
    let inst = stub("p1", Some(&client(11)));
    inst.mark_ready();
    inst.set_phase(Phase::Ending { note: None });
    let waiter = {
        let inst = inst.clone();
        tokio::spawn(async move { inst.wait_end_note(Duration::from_secs(3)).await })
    };
    tokio::task::yield_now().await;
    inst.set_end_note("berth: instance p1 ended: OOM".into());
    inst.mark_wiped();
    assert_eq!(waiter.await.unwrap().as_deref(), Some("berth: instance p1 ended: OOM"));
    assert_eq!(inst.wait_end_note(Duration::from_secs(1)).await.as_deref(), Some("berth: instance p1 ended: OOM"));

    let failed = stub("p2", Some(&client(12)));
    failed.set_phase(Phase::Failed(AdmitError::Gone { id: "p2".into() }));
    failed.set_end_note("ignored: a failed start keeps its error".into());
    failed.mark_wiped();
    assert!(matches!(&*failed.phase.borrow(), Phase::Wiped { failure: Some(_), note: None }));
    // An ordinary end has no note: the proxy waits at most its bound.
    let plain = stub("p3", Some(&client(13)));
    plain.set_phase(Phase::Ending { note: None });
    assert_eq!(plain.wait_end_note(Duration::from_secs(1)).await, None);
}

/// Waits its turn in the queue and reports `n` when it has a slot.
fn queued(
    slots: &Arc<Semaphore>,
    depth: &Arc<AtomicUsize>,
    size: usize,
    n: u32,
    order: &tokio::sync::mpsc::UnboundedSender<Result<u32, QueueError>>,
) -> tokio::task::JoinHandle<()> {
    let (slots, depth, order) = (slots.clone(), depth.clone(), order.clone());
    tokio::spawn(async move {
        let got = queue::take_slot(&slots, &depth, size, Duration::from_secs(60), || async { false }).await;
        match got {
            Ok(permit) => {
                let _ = order.send(Ok(n));
                // Hold the slot a moment, then pass it on.
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }
            Err(e) => {
                let _ = order.send(Err(e));
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn the_queue_serves_in_arrival_order_and_is_bounded() {
    let slots = Arc::new(Semaphore::new(1));
    let depth = Arc::new(AtomicUsize::new(0));
    let holder = slots.clone().try_acquire_owned().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for n in 1..=3 {
        tasks.push(queued(&slots, &depth, 3, n, &tx));
        // Each waiter is in the queue before the next arrives.
        tokio::task::yield_now().await;
        assert_eq!(depth.load(std::sync::atomic::Ordering::SeqCst), n as usize);
    }
    // The fourth finds the queue full, at once.
    tasks.push(queued(&slots, &depth, 3, 4, &tx));
    assert_eq!(rx.recv().await.unwrap(), Err(QueueError::Full));
    drop(holder);
    let served: Vec<_> = [rx.recv().await, rx.recv().await, rx.recv().await].into_iter().flatten().collect();
    assert_eq!(served, vec![Ok(1), Ok(2), Ok(3)], "first come, first served");
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(depth.load(std::sync::atomic::Ordering::SeqCst), 0, "the depth gauge is back to zero");
}

#[tokio::test(start_paused = true)]
async fn the_queue_times_out_and_lets_a_hung_up_client_go() {
    let slots = Arc::new(Semaphore::new(1));
    let depth = AtomicUsize::new(0);
    let _holder = slots.clone().try_acquire_owned().unwrap();
    let t = Duration::from_millis(500);
    let timed_out = queue::take_slot(&slots, &depth, 4, t, || async { false }).await;
    assert_eq!(timed_out.err(), Some(QueueError::TimedOut(t)));
    let mut polls = 0;
    let gone = queue::take_slot(&slots, &depth, 4, Duration::from_secs(60), || {
        polls += 1;
        let hung = polls >= 3;
        async move { hung }
    })
    .await;
    assert_eq!(gone.err(), Some(QueueError::ClientGone));
    assert_eq!(depth.load(std::sync::atomic::Ordering::SeqCst), 0);
}
