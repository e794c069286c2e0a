//! Finding the program a task names, as `execvp` would, before it starts.
//!
//! A name with a slash is a path; any other is looked for in each
//! directory on `PATH` (the task's own when its environment sets one, else
//! the node's), in order. A program that is not there, or cannot be run,
//! is a clear `StartFailed` before anything is cloned.
//!
//! The search costs a `stat` for every directory on `PATH` until the
//! program is found, and it ran at every start: with the node's `PATH` of
//! eleven directories, `true` cost nine, about 5 % of a no-op task's CPU on
//! the nodes (perf, `exec_rate`). So [`ProgramFinder`] remembers for
//! [`FOUND_REMEMBERED_MS`] where it found a name, like a shell's hash of
//! commands but for a moment only, and then checks only the remembered
//! file: a program removed or made unrunnable is seen at once, and one
//! installed earlier on `PATH` after the lookup within that moment.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Where `execvp` looks when the environment has no `PATH` (glibc's).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// How long a program found on `PATH` is taken to be there without a new
/// search: a program installed earlier on `PATH` is used at most this long
/// after it appeared.
pub const FOUND_REMEMBERED_MS: u64 = 1_000;

/// The most lookups remembered at once; when it is full the memory starts
/// over.
pub const FOUND_REMEMBERED_MAX: usize = 256;

/// Finds programs for the tasks of one node, remembering recent finds.
pub struct ProgramFinder {
    /// The node's `PATH` when it started, which tasks inherit with the rest
    /// of its environment.
    node_path: String,
    remember_for: Duration,
    found: Mutex<HashMap<Lookup, Found>>,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Lookup {
    program: String,
    search_path: Option<String>,
    working_dir: Option<PathBuf>,
}

struct Found {
    path: PathBuf,
    at: Instant,
}

impl ProgramFinder {
    /// A finder for tasks that inherit the node's `PATH` as it is now.
    pub fn for_this_node() -> ProgramFinder {
        ProgramFinder::new(node_search_path(), Duration::from_millis(FOUND_REMEMBERED_MS))
    }

    fn new(node_path: String, remember_for: Duration) -> ProgramFinder {
        ProgramFinder { node_path, remember_for, found: Mutex::new(HashMap::new()) }
    }

    /// The program `program` names, as `resolve_program` finds it with
    /// the task's `PATH` or else the node's; a name found on `PATH` within
    /// the last [`FOUND_REMEMBERED_MS`] is checked where it was found.
    pub fn find(
        &self,
        program: &str,
        task_path: Option<&str>,
        working_dir: Option<&Path>,
    ) -> Result<PathBuf, String> {
        self.find_at(program, task_path, working_dir, Instant::now())
    }

    fn find_at(
        &self,
        program: &str,
        task_path: Option<&str>,
        working_dir: Option<&Path>,
        now: Instant,
    ) -> Result<PathBuf, String> {
        let search_path = task_path.unwrap_or(&self.node_path);
        if program.is_empty() || program.contains('/') {
            // One `stat` whatever is remembered.
            return resolve_program(program, search_path, working_dir);
        }
        let lookup = Lookup {
            program: program.to_owned(),
            search_path: task_path.map(str::to_owned),
            working_dir: working_dir.map(Path::to_path_buf),
        };
        let remembered = {
            let found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
            found
                .get(&lookup)
                .filter(|found| now.saturating_duration_since(found.at) < self.remember_for)
                .map(|found| found.path.clone())
        };
        if let Some(path) = remembered
            && check_executable(&path).is_ok()
        {
            return Ok(path);
        }
        let path = resolve_program(program, search_path, working_dir)?;
        let mut found = self.found.lock().unwrap_or_else(PoisonError::into_inner);
        if found.len() >= FOUND_REMEMBERED_MAX && !found.contains_key(&lookup) {
            found.clear();
        }
        found.insert(lookup, Found { path: path.clone(), at: now });
        Ok(path)
    }
}

/// The node's `PATH`, or the default `execvp` searches without one.
fn node_search_path() -> String {
    std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned())
}

/// Finds `program` as `execvp` in the task's working directory would: a
/// name with a slash as it is, any other in the directories of
/// `search_path`; relative paths, in either, from `working_dir` when the
/// task has one. Returns an absolute path to an executable file.
fn resolve_program(
    program: &str,
    search_path: &str,
    working_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    let absolute = |path: PathBuf| -> Result<PathBuf, String> {
        if path.is_absolute() {
            return Ok(path);
        }
        match working_dir {
            Some(dir) => std::path::absolute(dir.join(path)),
            None => std::path::absolute(path),
        }
        .map_err(|err| err.to_string())
    };
    if program.contains('/') {
        let path = absolute(PathBuf::from(program))?;
        return check_executable(&path).map(|()| path).map_err(String::from);
    }
    let mut last_error = None;
    for dir in search_path.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = absolute(Path::new(dir).join(program))?;
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(unusable @ NotExecutable::Unusable(_)) => last_error = Some(String::from(unusable)),
            // Most directories on PATH do not hold the program.
            Err(NotExecutable::Absent(_)) => {}
        }
    }
    Err(last_error.unwrap_or_else(|| format!("not found on PATH ({search_path})")))
}

/// Why a path cannot be run.
enum NotExecutable {
    /// It cannot be looked at: missing, or behind a directory we may not search.
    Absent(io::Error),
    /// It is there, but not an executable file.
    Unusable(String),
}

impl From<NotExecutable> for String {
    fn from(reason: NotExecutable) -> String {
        match reason {
            NotExecutable::Absent(err) => err.to_string(),
            NotExecutable::Unusable(reason) => reason,
        }
    }
}

fn check_executable(path: &Path) -> Result<(), NotExecutable> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(NotExecutable::Absent)?;
    if !metadata.is_file() {
        return Err(NotExecutable::Unusable(format!("{} is not a file", path.display())));
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(NotExecutable::Unusable(format!("{} is not executable", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn write_program(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_program_is_found_on_the_tasks_path_or_the_nodes() {
        let finder = ProgramFinder::for_this_node();
        let true_path = finder.find("true", None, None).unwrap();
        assert!(true_path.is_absolute() && true_path.ends_with("true"), "{true_path:?}");
        let dir = tempfile::tempdir().unwrap();
        assert!(
            finder
                .find("true", Some(dir.path().to_str().unwrap()), None)
                .unwrap_err()
                .contains("not found on PATH"),
            "the task's PATH replaces the node's"
        );
        assert_eq!(finder.find(true_path.to_str().unwrap(), None, None).unwrap(), true_path);
    }

    #[test]
    fn what_cannot_run_is_refused_with_a_reason() {
        let finder = ProgramFinder::for_this_node();
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "not a program").unwrap();
        let err = finder.find(plain.to_str().unwrap(), None, None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        let err = finder.find(dir.path().to_str().unwrap(), None, None).unwrap_err();
        assert!(err.contains("not a file"), "{err}");
        assert!(finder.find("", None, None).unwrap_err().contains("empty"));
        let err = finder.find("no-such-program-taskraft", None, None).unwrap_err();
        assert!(err.contains("not found"), "{err}");
        // On PATH, a file that cannot run is named, not just "not found".
        let err = finder.find("plain", Some(dir.path().to_str().unwrap()), None).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
    }

    #[test]
    fn a_relative_program_is_found_from_the_tasks_working_directory() {
        let finder = ProgramFinder::for_this_node();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("run.sh");
        write_program(&script);
        let found = finder.find("./run.sh", None, Some(dir.path())).unwrap();
        assert_eq!(found.canonicalize().unwrap(), script.canonicalize().unwrap());
        // A relative PATH entry too, as execvp after the chdir would.
        let found = finder.find("run.sh", Some("."), Some(dir.path())).unwrap();
        assert_eq!(found.canonicalize().unwrap(), script.canonicalize().unwrap());
        assert!(finder.find("./run.sh", None, None).is_err(), "not from the node's directory");
        let elsewhere = tempfile::tempdir().unwrap();
        assert!(
            finder.find("run.sh", Some("."), Some(elsewhere.path())).is_err(),
            "a find in one working directory is not remembered for another"
        );
    }

    #[test]
    fn a_remembered_program_is_checked_and_forgotten_after_a_while() {
        let early = tempfile::tempdir().unwrap();
        let late = tempfile::tempdir().unwrap();
        let search_path = format!("{}:{}", early.path().display(), late.path().display());
        let in_late = late.path().join("job");
        let in_early = early.path().join("job");
        write_program(&in_late);

        let remember_for = Duration::from_secs(1);
        let finder = ProgramFinder::new(search_path.clone(), remember_for);
        let start = Instant::now();
        let find = |now: Instant| finder.find_at("job", None, None, now);
        assert_eq!(find(start).unwrap(), in_late);
        // Installed earlier on PATH: the remembered find holds for a while.
        write_program(&in_early);
        assert_eq!(find(start + remember_for / 2).unwrap(), in_late);
        // The task's own PATH is a lookup of its own, searched afresh.
        assert_eq!(finder.find_at("job", Some(&search_path), None, start).unwrap(), in_early);
        let later = start + remember_for;
        assert_eq!(find(later).unwrap(), in_early, "forgotten after a while");

        // A remembered program that is gone is searched for again at once.
        std::fs::remove_file(&in_early).unwrap();
        assert_eq!(find(later).unwrap(), in_late);
        std::fs::remove_file(&in_late).unwrap();
        assert!(find(later).unwrap_err().contains("not found on PATH"));
    }

    #[test]
    fn the_memory_of_finds_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..FOUND_REMEMBERED_MAX + 10 {
            write_program(&dir.path().join(format!("p{i}")));
        }
        let finder = ProgramFinder::new(dir.path().display().to_string(), Duration::from_secs(60));
        for i in 0..FOUND_REMEMBERED_MAX + 10 {
            finder.find(&format!("p{i}"), None, None).unwrap();
            let remembered = finder.found.lock().unwrap().len();
            assert!(remembered <= FOUND_REMEMBERED_MAX, "{remembered} finds remembered");
        }
    }
}
