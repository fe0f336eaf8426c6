//! Cases 1-4: a call reaches the instance; namespaces and id ranges;
//! client and connection scope.

use super::*;

// ---------------------------------------------------------------------------
// 1. A call through the agent socket reaches the instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_through_agent_reaches_the_instance() {
    let agent = agent("core-ping", 2, "1s").start_async().await;
    let r = ping(&agent).await;

    let instances = agent.state_dir().join("instances");
    assert!(Path::new(&r.root).starts_with(&instances), "root {} is not under {}", r.root, instances.display());
    let id = instance_id_of_root(&agent, &r.root);
    let want_addr = format!("unix://{}/{id}/run/buildkitd.sock", instances.display());
    let addr_pos = r.args.iter().position(|a| a == "--addr");
    assert!(
        addr_pos.is_some_and(|i| r.args.get(i + 1) == Some(&want_addr)),
        "args {:?} lack `--addr {want_addr}`",
        r.args
    );
    assert!(r.args.windows(2).any(|w| w[0] == "--root" && w[1] == r.root), "{:?}", r.args);
    assert!(r.addrs.contains(&want_addr), "addrs {:?}", r.addrs);
    assert!(!r.token.is_empty());

    let end = end_line(&agent, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_clean(&agent, "after the idle end").await;
}

// ---------------------------------------------------------------------------
// 2. The instance is in its own namespaces with its own id range.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_runs_in_its_own_namespaces_with_a_pool_range() {
    let agent = agent("core-ns", 2, "1s").start_async().await;
    let r = ping(&agent).await;
    let id = instance_id_of_root(&agent, &r.root);
    let agent_pid = agent.pid().expect("agent running");
    let ns =
        |pid: &str, name: &str| fs::read_link(format!("/proc/{pid}/ns/{name}")).unwrap().to_string_lossy().into_owned();

    assert_ne!(r.ns_user, ns(&agent_pid.to_string(), "user"), "same user namespace as the agent");
    assert!(r.ns_user.starts_with("user:["), "{}", r.ns_user);
    for (name, got) in [("pid", &r.ns_pid), ("mnt", &r.ns_mnt), ("ipc", &r.ns_ipc), ("uts", &r.ns_uts)] {
        assert!(got.starts_with(&format!("{name}:[")), "{name}: {got}");
        assert_ne!(got, &ns("self", name), "{name} namespace is the host's");
        assert_ne!(got, &ns(&agent_pid.to_string(), name), "{name} namespace is the agent's");
    }

    let (pool_base, pool_count) = agent.idmap();
    let (pool_lo, pool_hi) = (pool_base as u64, pool_base as u64 + pool_count as u64);
    for (what, map) in [("uid_map", &r.uid_map), ("gid_map", &r.gid_map)] {
        let (lo, hi) = single_range(map);
        assert!(lo >= pool_lo && hi <= pool_hi, "{what} range [{lo}, {hi}) is outside the pool [{pool_lo}, {pool_hi})");
        assert_eq!((lo - pool_lo) % 65536, 0, "{what} base {lo} not aligned in the pool");
    }
    assert_eq!(single_range(&r.uid_map), single_range(&r.gid_map));
    assert_eq!((r.uid, r.gid), (0, 0), "daemon is not root inside its namespace");
    assert_eq!(r.pid, 1, "daemon is not pid 1 of its pid namespace");
    assert_eq!(r.hostname, format!("berth-{id}"));

    end_line(&agent, &id).await;
    assert_clean(&agent, "after the idle end").await;
}

// ---------------------------------------------------------------------------
// 3. Two clients, two instances, disjoint id ranges.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_get_two_instances_with_disjoint_ranges() {
    // A's instance must stay while B's starts (~30 s under emulation).
    let agent = agent("core-two-clients", 2, "8s").start_async().await;
    let a = fc_ok(&agent, 1000, &["ping"]).await;
    let b = fc_ok(&agent, 1001, &["ping"]).await;
    let ta = a["token"].as_str().unwrap().to_string();
    let tb = b["token"].as_str().unwrap().to_string();
    assert_ne!(ta, tb, "uid 1000 and uid 1001 got the same instance");
    let ia = instance_id_of_root(&agent, a["root"].as_str().unwrap());
    let ib = instance_id_of_root(&agent, b["root"].as_str().unwrap());
    assert_ne!(ia, ib);

    // Both alive at once: both dirs exist and both answer again with their token.
    for id in [&ia, &ib] {
        assert!(agent.state_dir().join("instances").join(id).is_dir(), "{id} not alive");
    }
    let a2 = fc_ok(&agent, 1000, &["ping"]).await;
    let b2 = fc_ok(&agent, 1001, &["ping"]).await;
    assert_eq!(a2["token"], ta.as_str(), "uid 1000's instance changed");
    assert_eq!(b2["token"], tb.as_str(), "uid 1001's instance changed");

    for key in ["uid_map", "gid_map"] {
        let (alo, ahi) = single_range(a[key].as_str().unwrap());
        let (blo, bhi) = single_range(b[key].as_str().unwrap());
        assert!(ahi <= blo || bhi <= alo, "{key}: [{alo},{ahi}) and [{blo},{bhi}) overlap");
    }
    assert_ne!(a["ns"]["user"], b["ns"]["user"]);
    assert_ne!(a["ns"]["pid"], b["ns"]["pid"]);
    assert_ne!(a["ns"]["mnt"], b["ns"]["mnt"]);

    end_line(&agent, &ia).await;
    end_line(&agent, &ib).await;
    assert_clean(&agent, "after both ended").await;
}

// ---------------------------------------------------------------------------
// 4. Client scope shares one instance across connections; connection scope does not.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_scope_shares_and_connection_scope_does_not() {
    // Client scope: two connections, one after the other, same instance.
    let ca = agent("core-scope-client", 2, "2s").start_async().await;
    let p1 = ping(&ca).await; // its connection is dropped on return
    let p2 = ping(&ca).await;
    assert_eq!(p1.token, p2.token, "client scope: a second connection got another instance");
    // Also two connections open at once.
    let mut c3 = fake_client(ca.socket()).await;
    let mut c4 = fake_client(ca.socket()).await;
    let t3 = c3.ping(PingRequest {}).await.unwrap().into_inner().token;
    let t4 = c4.ping(PingRequest {}).await.unwrap().into_inner().token;
    assert_eq!((t3.as_str(), t4.as_str()), (p1.token.as_str(), p1.token.as_str()));
    drop((c3, c4));
    let id = instance_id_of_root(&ca, &p1.root);
    let end = end_line(&ca, &id).await;
    assert_eq!(end["reason"], "idle", "{end}");
    assert_eq!(ca.instance_ends().len(), 1, "client scope started more than one instance");

    // Connection scope: each connection its own instance, ended when it closes.
    let cc = agent("core-scope-conn", 2, "60s").arg("--scope").arg("connection").start_async().await;
    let mut k1 = fake_client(cc.socket()).await;
    let mut k2 = fake_client(cc.socket()).await;
    let r1 = k1.ping(PingRequest {}).await.unwrap().into_inner();
    let r2 = k2.ping(PingRequest {}).await.unwrap().into_inner();
    assert_ne!(r1.token, r2.token, "connection scope: two connections shared an instance");
    let (id1, id2) = (instance_id_of_root(&cc, &r1.root), instance_id_of_root(&cc, &r2.root));
    assert_ne!(id1, id2);

    drop(k1);
    let e1 = end_line(&cc, &id1).await;
    assert_eq!(e1["reason"], "closed", "{e1}");
    // The other connection's instance is untouched.
    let again = k2.ping(PingRequest {}).await.unwrap().into_inner();
    assert_eq!(again.token, r2.token);
    assert!(cc.state_dir().join("instances").join(&id2).is_dir());
    drop(k2);
    let e2 = end_line(&cc, &id2).await;
    assert_eq!(e2["reason"], "closed", "{e2}");
    assert_clean(&cc, "connection scope after both closed").await;
    assert_clean(&ca, "client scope after idle").await;
}
