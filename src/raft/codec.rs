//! The one encoding for bytes that leave a node or reach its disk: postcard,
//! a compact serde format. Keeping it in one place makes it swappable and
//! makes every decode failure a clear error rather than a panic.

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
#[error("cannot decode {what}: {source}")]
pub struct DecodeError {
    pub what: &'static str,
    #[source]
    pub source: postcard::Error,
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail; if it does, our types are broken.
    postcard::to_allocvec(value).expect("serde types of our own encode with postcard")
}

/// Appends the encoding of `value` to `bytes`.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, bytes: &mut Vec<u8>) {
    let taken = std::mem::take(bytes);
    *bytes =
        postcard::to_extend(value, taken).expect("serde types of our own encode with postcard");
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|source| DecodeError { what, source })
}

/// Decodes one value from the front of `bytes`; returns it with the rest.
pub fn decode_prefix<'a, T: DeserializeOwned>(
    what: &'static str,
    bytes: &'a [u8],
) -> Result<(T, &'a [u8]), DecodeError> {
    postcard::take_from_bytes(bytes).map_err(|source| DecodeError { what, source })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;
    use crate::scheduler::{Backoff, Schedule, TaskSpec};

    /// The layout before `TaskSpec` was made compact: plain strings, a list
    /// and maps. Logs and snapshots written with it must read the same.
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct PlainCommand {
        program: String,
        args: Vec<String>,
        env: BTreeMap<String, String>,
        working_dir: Option<String>,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct PlainSpec {
        queue: String,
        priority: i32,
        schedule: Schedule,
        command: PlainCommand,
        timeout_ms: u64,
        max_attempts: u32,
        backoff: Backoff,
        idempotency_key: Option<String>,
        labels: BTreeMap<String, String>,
    }

    fn plain(spec: &TaskSpec) -> PlainSpec {
        PlainSpec {
            queue: spec.queue.to_string(),
            priority: spec.priority,
            schedule: spec.schedule,
            command: PlainCommand {
                program: spec.command.program.to_string(),
                args: spec.command.args.to_vec(),
                env: (*spec.command.env).clone(),
                working_dir: spec.command.working_dir.as_deref().map(str::to_owned),
            },
            timeout_ms: spec.timeout_ms,
            max_attempts: spec.max_attempts,
            backoff: spec.backoff,
            idempotency_key: spec.idempotency_key.as_deref().map(str::to_owned),
            labels: (*spec.labels).clone(),
        }
    }

    #[test]
    fn the_compact_spec_encodes_exactly_as_the_plain_one_did() {
        let bare = TaskSpec::for_test("true");
        let mut full = TaskSpec::for_test("/bin/sh");
        full.queue = "emails".into();
        full.command.args = vec!["-c".into(), "echo hi".into()].into();
        full.command.env.insert("A".into(), "1".into());
        full.command.working_dir = Some("/tmp".into());
        full.idempotency_key = Some("key-1".into());
        full.labels.insert("zone".into(), "eu".into());
        for spec in [bare, full] {
            let bytes = encode(&spec);
            assert_eq!(bytes, encode(&plain(&spec)), "{spec:?}");
            let decoded: TaskSpec = decode("spec", &bytes).unwrap();
            assert_eq!(decoded, spec);
            let old: PlainSpec = decode("spec", &bytes).unwrap();
            assert_eq!(old, plain(&spec));
        }
    }
}
