//! The `arcgate` command line.
fn main() {}
