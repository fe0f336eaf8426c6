use super::*;

const GI: u64 = 1 << 30;

fn shape(mem_gi: u64, millicpus: u64) -> Shape {
    Shape { memory: mem_gi * GI, millicpus, disk: 0 }
}

#[test]
fn memory_binds_on_a_small_memory_node() {
    let p = plan(shape(16, 8000), shape(1, 500), shape(4, 1000), MaxBuilds::Auto, None);
    assert_eq!((p.slots_by_memory, p.slots_by_cpu), (3, 7));
    assert_eq!(p.slots, 3);
    assert_eq!(p.binding, Binding::Memory);
    assert_eq!(p.headroom, Shape { memory: 3 * GI, millicpus: 4500, disk: 0 });
    assert!(!p.overcommitted);
}

#[test]
fn cpu_binds_on_odd_shapes_and_rounds_down() {
    // 7.5 CPUs usable over 2 per build = 3 slots, 1.5 CPUs spare.
    let p = plan(
        Shape { memory: 64 * GI, millicpus: 7750, disk: 0 },
        Shape { memory: GI, millicpus: 250, disk: 0 },
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
    assert_eq!(p.headroom, Shape { memory: 0, millicpus: 0, disk: 0 });
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
    assert_eq!(s, Shape { memory: 2 * GI, millicpus: 1500, disk: 0 });
    // v2 "max" means no limit: the host's figures stay.
    std::fs::write(root.join("pod/memory.max"), "max\n").unwrap();
    std::fs::write(root.join("pod/cpu.max"), "max 100000\n").unwrap();
    let s = this_node(&root, &t.path().join("proc"));
    assert!(s.memory > 2 * GI && s.millicpus >= 1000);
}

fn with_disk(s: Shape, disk_gi: u64) -> Shape {
    Shape { disk: disk_gi * GI, ..s }
}

#[test]
fn disk_binds_when_the_state_dir_is_small() {
    // 100Gi filesystem, 10Gi kept free, 20Gi per build: 4 slots by disk,
    // though memory allows 7 and CPU 15.
    let p = plan(
        with_disk(shape(32, 16000), 100),
        with_disk(shape(2, 1000), 10),
        with_disk(shape(4, 1000), 20),
        MaxBuilds::Auto,
        None,
    );
    assert_eq!((p.slots_by_memory, p.slots_by_cpu, p.slots_by_disk), (7, 15, Some(4)));
    assert_eq!((p.slots, p.binding), (4, Binding::Disk));
    assert_eq!(p.headroom.disk, 10 * GI);
    assert!(!p.overcommitted);
    let text = render(&p, OutputFormat::Text);
    assert!(text.contains("disk allows 4; bound by disk") && text.contains("20Gi disk"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&render(&p, OutputFormat::Json)).unwrap();
    assert_eq!((v["slots_by_disk"].as_u64(), v["binding"].as_str()), (Some(4), Some("disk")));
}

#[test]
fn unlimited_disk_never_binds_and_odd_disk_shapes_round_down() {
    // --build-disk 0: no disk figure, memory binds.
    let p = plan(with_disk(shape(32, 16000), 1), shape(2, 1000), shape(4, 1000), MaxBuilds::Auto, None);
    assert_eq!((p.slots_by_disk, p.slots, p.binding), (None, 7, Binding::Memory));
    assert!(!p.overcommitted);
    assert!(render(&p, OutputFormat::Text).contains("disk allows any number (no disk limit)"));
    // 59.9Gi usable over 20Gi: 2 slots, not 3.
    let node = Shape { disk: 60 * GI - (100 << 20), ..shape(64, 32000) };
    let p = plan(node, shape(0, 0), with_disk(shape(1, 1000), 20), MaxBuilds::Auto, None);
    assert_eq!((p.slots_by_disk, p.slots), (Some(2), 2));
    // A state dir smaller than its reserve: one overcommitted slot, no underflow.
    let p = plan(
        with_disk(shape(64, 32000), 5),
        with_disk(shape(0, 0), 10),
        with_disk(shape(1, 1000), 1),
        MaxBuilds::Auto,
        None,
    );
    assert_eq!((p.slots_by_disk, p.slots, p.headroom.disk), (Some(0), 1, 0));
    assert!(p.overcommitted);
    // A fixed count past what the disk holds is overcommitted too.
    let p =
        plan(with_disk(shape(64, 32000), 100), shape(0, 0), with_disk(shape(1, 1000), 30), MaxBuilds::Fixed(4), None);
    assert_eq!((p.slots_by_disk, p.slots), (Some(3), 4));
    assert!(p.overcommitted);
}

#[test]
fn a_percent_reserve_is_of_the_filesystem() {
    use crate::config::quantity::parse_share;
    let caps = crate::config::CapacityArgs {
        max_builds: MaxBuilds::Auto,
        reserve_memory: GI,
        reserve_cpus: 500,
        reserve_disk: parse_share("10%").unwrap(),
    };
    assert_eq!(reserve_of(&caps, 200 * GI).disk, 20 * GI);
    let p = plan(
        with_disk(shape(64, 32000), 200),
        reserve_of(&caps, 200 * GI),
        with_disk(shape(1, 1000), 20),
        MaxBuilds::Auto,
        None,
    );
    assert_eq!(p.slots_by_disk, Some(9));
}
