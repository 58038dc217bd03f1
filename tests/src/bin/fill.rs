//! Fills counter generation 0 of a pinned portwatch with N synthetic entries (for benchmarks and
//! manual checks): `fill PIN_PATH N`.
fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let pin = std::path::PathBuf::from(args.next().expect("PIN_PATH"));
    let n: u64 = args.next().expect("N").parse()?;
    portwatch_tests::fill_counters(&pin, 0, &portwatch_tests::synthetic_entries(n))
}
