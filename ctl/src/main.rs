//! `portwatch`: count, in the kernel, the traffic each remote IP sends to your ports.

fn main() -> std::process::ExitCode {
    portwatch::main()
}
