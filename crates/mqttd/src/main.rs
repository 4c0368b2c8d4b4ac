//! The `mqttd` command: the broker and its client tools.

fn main() {
    eprintln!(
        "mqttd {}: the broker is not built yet; see the README",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(2);
}
