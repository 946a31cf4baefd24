//! A test run again as a child process of its own test binary, and killed
//! on purpose: how crash tests put a real `kill -9` in the middle of a
//! write. The child is the same test function, told by an environment
//! variable that it is the child; it prints a line per unit of progress
//! (a commit, a batch) and `done` when it finished by itself.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The name libtest knows the test function `function` of the module
/// `module_path` (give it `module_path!()`) by: the module path without
/// the test binary's crate name, then the function.
pub fn test_name(module_path: &str, function: &str) -> String {
    match module_path.split_once("::") {
        Some((_, module)) => format!("{module}::{function}"),
        None => function.to_owned(),
    }
}

/// This test binary again, running the one test called `test` (see
/// [`test_name`]) with its output shown: stdout piped to the parent,
/// stderr inherited.
pub fn rerun(test: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = Command::new(exe);
    command
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    command
}

/// How often and when [`KillPlan::run`] kills a child.
#[derive(Clone, Debug)]
pub struct KillPlan {
    /// Kills before the child may finish.
    pub kills: usize,
    /// Seeds the random choices, so a failure can be replayed.
    pub seed: u64,
    /// A kill comes after a random number of progress lines in this range
    /// (counted per child)…
    pub after: Range<usize>,
    /// …and a random pause in this range of milliseconds, so it lands
    /// anywhere in the next unit of work whatever the machine's speed.
    pub pause_ms: Range<u64>,
}

/// What [`KillPlan::run`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KillReport {
    /// Children killed.
    pub kills: usize,
    /// Progress lines over every child.
    pub progress: usize,
}

impl KillPlan {
    /// Runs `test` as a child with `env` until a child prints `done` and
    /// exits successfully, first killing children `kills` times with
    /// SIGKILL. `is_progress` says which lines count. Panics if a child
    /// fails, stops by itself before it was killed enough, or finishes
    /// before it was.
    pub fn run(
        &self,
        test: &str,
        env: &[(&str, String)],
        is_progress: impl Fn(&str) -> bool,
    ) -> KillReport {
        let mut rng = fastrand::Rng::with_seed(self.seed);
        let mut report = KillReport {
            kills: 0,
            progress: 0,
        };
        loop {
            let mut child = rerun(test)
                .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
                .spawn()
                .expect("the test binary starts again");
            let stdout = child.stdout.take().expect("a piped stdout");
            let kill_after = rng.usize(self.after.clone());
            let (mut seen, mut done, mut killed) = (0, false, false);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if is_progress(&line) {
                    seen += 1;
                    report.progress += 1;
                    if report.kills < self.kills && seen == kill_after {
                        std::thread::sleep(Duration::from_millis(rng.u64(self.pause_ms.clone())));
                        child.kill().expect("SIGKILL the child");
                        report.kills += 1;
                        killed = true;
                        break;
                    }
                }
                done |= line == "done";
            }
            let status = child.wait().expect("the child is reaped");
            if done {
                assert!(status.success(), "the child failed: {status}");
                assert_eq!(
                    report.kills, self.kills,
                    "the child finished before it was killed {} times",
                    self.kills
                );
                return report;
            }
            assert!(killed, "the child stopped by itself: {status}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_drop_the_binary_crate() {
        assert_eq!(test_name("projections::crash", "killed"), "crash::killed");
        assert_eq!(test_name("crash", "killed"), "killed");
        assert_eq!(
            test_name("cli::any_domain::sqlite", "t"),
            "any_domain::sqlite::t"
        );
    }
}
