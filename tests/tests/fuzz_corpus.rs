//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
//! same bodies the cargo-fuzz targets run (`berth_tests::fuzz`), so CI
//! checks every input the fuzzers kept, and every crash they found once,
//! in seconds and without nightly or sanitizers.

use std::path::PathBuf;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, body) in berth_tests::fuzz::TARGETS {
        let dir = root.join(name);
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert!(!files.is_empty(), "no corpus for {name} in {}", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| body(&data)) {
                panic!("{name}: {} fails: {e:?}", f.display());
            }
        }
        eprintln!("{name}: {} inputs replayed", files.len());
    }
}
