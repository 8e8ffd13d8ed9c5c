//! placeholder until the GEMM benchmark lands
pub fn run(_t: usize, _j: Option<&std::path::Path>) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
