use super::*;

const GI: u64 = 1 << 30;

fn shape(mem_gi: u64, millicpus: u64) -> Shape {
    Shape { memory: mem_gi * GI, millicpus }
}

#[test]
fn memory_binds_on_a_small_memory_node() {
    let p = plan(shape(16, 8000), shape(1, 500), shape(4, 1000), MaxBuilds::Auto, None);
    assert_eq!((p.slots_by_memory, p.slots_by_cpu), (3, 7));
    assert_eq!(p.slots, 3);
    assert_eq!(p.binding, Binding::Memory);
    assert_eq!(p.headroom, Shape { memory: 3 * GI, millicpus: 4500 });
    assert!(!p.overcommitted);
}

#[test]
fn cpu_binds_on_odd_shapes_and_rounds_down() {
    // 7.5 CPUs usable over 2 per build = 3 slots, 1.5 CPUs spare.
    let p = plan(
        Shape { memory: 64 * GI, millicpus: 7750 },
        Shape { memory: GI, millicpus: 250 },
        shape(2, 2000),
        MaxBuilds::Auto,
        None,
    );
    assert_eq!(p.slots, 3);
    assert_eq!(p.binding, Binding::Cpu);
    assert_eq!(p.headroom.millicpus, 1500);
    assert_eq!(p.headroom.memory, 63 * GI - 6 * GI);
}

#[test]
fn at_least_one_slot_even_when_limits_do_not_fit() {
    let p = plan(shape(2, 1000), shape(1, 500), shape(4, 2000), MaxBuilds::Auto, None);
    assert_eq!((p.slots_by_memory, p.slots_by_cpu, p.slots), (0, 0, 1));
    assert!(p.overcommitted);
    assert_eq!(p.headroom, Shape { memory: 0, millicpus: 0 });
    // Reserves larger than the node do not underflow.
    let p = plan(shape(1, 100), shape(8, 8000), shape(1, 100), MaxBuilds::Auto, None);
    assert_eq!(p.slots, 1);
}

#[test]
fn fixed_slots_and_pool_sizing() {
    let p = plan(shape(32, 16000), shape(2, 1000), shape(4, 2000), MaxBuilds::Fixed(5), Some(23));
    assert_eq!(p.slots, 5);
    assert_eq!(p.binding, Binding::Fixed);
    assert_eq!(p.nodes, Some(5)); // ceil(23/5)
    let p = plan(shape(32, 16000), shape(2, 1000), shape(4, 2000), MaxBuilds::Auto, Some(70));
    assert_eq!(p.slots, 7); // memory: 30/4 = 7, CPU: 15/2 = 7
    assert_eq!(p.nodes, Some(10));
}

#[test]
fn json_has_slots_and_nodes() {
    let p = plan(shape(32, 16000), shape(2, 1000), shape(4, 2000), MaxBuilds::Auto, Some(70));
    let v: serde_json::Value = serde_json::from_str(&render(&p, OutputFormat::Json)).unwrap();
    assert_eq!(v["slots"], 7);
    assert_eq!(v["nodes"], 10);
    let p = plan(shape(32, 16000), shape(2, 1000), shape(4, 2000), MaxBuilds::Auto, None);
    let v: serde_json::Value = serde_json::from_str(&render(&p, OutputFormat::Json)).unwrap();
    assert!(v.get("nodes").is_none());
    let text = render(&p, OutputFormat::Text);
    assert!(text.contains("slots:     7") && text.contains("32Gi memory") && text.contains("headroom:  2Gi"), "{text}");
}

#[test]
fn own_cgroup_limits_lower_the_node_shape() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("cg");
    std::fs::create_dir_all(root.join("pod")).unwrap();
    std::fs::write(root.join("cgroup.controllers"), "cpu memory pids").unwrap();
    std::fs::write(root.join("pod/memory.max"), "2147483648\n").unwrap();
    std::fs::write(root.join("pod/cpu.max"), "150000 100000\n").unwrap();
    std::fs::create_dir_all(t.path().join("proc/self")).unwrap();
    std::fs::write(t.path().join("proc/self/cgroup"), "0::/pod\n").unwrap();
    let s = this_node(&root, &t.path().join("proc"));
    assert_eq!(s, Shape { memory: 2 * GI, millicpus: 1500 });
    // v2 "max" means no limit: the host's figures stay.
    std::fs::write(root.join("pod/memory.max"), "max\n").unwrap();
    std::fs::write(root.join("pod/cpu.max"), "max 100000\n").unwrap();
    let s = this_node(&root, &t.path().join("proc"));
    assert!(s.memory > 2 * GI && s.millicpus >= 1000);
}
