//! Replays every committed corpus input of every fuzz target through the code the target runs,
//! on the stable toolchain and without libFuzzer, so that `scripts/test.sh` checks the whole
//! corpus (crash regressions included) on every run, even when it does not fuzz.

use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};
use mqttd_fuzz::session::{run, Input};

/// What each target in `fuzz_targets/` runs on one input, as its `fuzz_target!` body does.
fn runner(target: &str) -> Option<fn(&[u8])> {
    Some(match target {
        "decode_packet" => mqttd_fuzz::decode_packet,
        "broker" => |data| {
            mqttd_fuzz::broker::run(data);
        },
        "quic_guard" => mqttd_broker::fuzzing::quic_guard,
        "cluster_frame" => |data| {
            mqttd_fuzz::cluster_frame(data);
        },
        "store_record" => |data| {
            mqttd_fuzz::store_record(data);
        },
        // libfuzzer-sys builds a structured input with `arbitrary_take_rest`, and skips bytes
        // that do not make one.
        "session" => |data| {
            if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
                run(&input);
            }
        },
        _ => return None,
    })
}

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The sorted names of the entries of `dir` (file stems for `.rs` files when `stem`).
fn names(dir: &Path, stem: bool) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("directory entry").path();
            let name = if stem {
                path.file_stem()
            } else {
                path.file_name()
            };
            name.expect("a file name").to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

fn targets() -> Vec<String> {
    names(&fuzz_dir().join("fuzz_targets"), true)
}

#[test]
fn every_target_has_a_replay_and_a_corpus() {
    let targets = targets();
    assert!(!targets.is_empty());
    for target in &targets {
        assert!(
            runner(target).is_some(),
            "tests/corpus.rs does not know how to run fuzz target {target}: add it to runner()"
        );
        let corpus = fuzz_dir().join("corpus").join(target);
        assert!(
            corpus.is_dir() && !names(&corpus, false).is_empty(),
            "fuzz target {target} has no seeds in {}",
            corpus.display()
        );
    }
    for dir in names(&fuzz_dir().join("corpus"), false) {
        assert!(
            targets.contains(&dir),
            "corpus/{dir} belongs to no fuzz target"
        );
    }
}

#[test]
fn every_corpus_input_passes_its_target() {
    let mut replayed = 0;
    for target in targets() {
        let Some(run) = runner(&target) else {
            continue; // reported by every_target_has_a_replay_and_a_corpus
        };
        let corpus = fuzz_dir().join("corpus").join(&target);
        if !corpus.is_dir() {
            continue;
        }
        for name in names(&corpus, false) {
            let path = corpus.join(&name);
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            // Name the input that fails; the panic itself says what went wrong.
            eprintln!("replaying {target}/{name}");
            run(&data);
            replayed += 1;
        }
    }
    println!("replayed {replayed} corpus inputs");
    assert!(replayed > 0);
}
