//! arcgate-load: the bundled load generator (scenarios arrive with their own issue).
fn main() {
    eprintln!("arcgate-load: no scenarios yet; see docs/benchmarks.md");
    std::process::exit(2);
}
