//! `taskraft-launch`: the launch trampoline as a binary of its own, so that
//! starting a task `exec`s a small program rather than the whole node (see
//! `taskraft::executor::launch`). Nodes look for it beside their own binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    taskraft::executor::launch::run(std::env::args_os().skip(1))
}
