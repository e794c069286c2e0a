//! The value the log store keeps under one key: a run of consecutive
//! encoded log entries, the first of which has the index in the key.
//!
//! One append is one run (or a few, see [`split`]), so one append is one
//! insert into sled. A sled batch of several inserts seals and writes out
//! sled's buffer twice (`pin_log`), and every buffer write wakes every idle
//! thread of sled's pool; at 64 clients that was about a quarter of a
//! node's CPU. A run is read entry by entry: each entry has its length in
//! front, so reading the last entry, or the entries of a range, decodes
//! only those.
//!
//! Layout: the number of entries as a little-endian `u32`, then for each
//! entry its length as a little-endian `u32` and its bytes.

use std::io;

const COUNT_BYTES: usize = 4;
const LENGTH_BYTES: usize = 4;

/// Encodes `entries` (each already encoded) as one run.
pub fn encode<B: AsRef<[u8]>>(entries: &[B]) -> Vec<u8> {
    let n_bytes: usize = entries.iter().map(|entry| LENGTH_BYTES + entry.as_ref().len()).sum();
    let mut run = Vec::with_capacity(COUNT_BYTES + n_bytes);
    run.extend_from_slice(&count_u32(entries.len()).to_le_bytes());
    for entry in entries {
        let entry = entry.as_ref();
        run.extend_from_slice(&count_u32(entry.len()).to_le_bytes());
        run.extend_from_slice(entry);
    }
    run
}

fn count_u32(n: usize) -> u32 {
    // A run holds one append, which openraft bounds far below 4 GiB.
    u32::try_from(n).expect("a run of the log fits its u32 counts")
}

/// Splits encoded entries into groups of at most `run_bytes_max` bytes each
/// (an entry larger than that is a group of its own), in order.
pub fn split<B: AsRef<[u8]>>(entries: &[B], run_bytes_max: usize) -> Vec<&[B]> {
    let mut runs = Vec::new();
    let mut start = 0;
    let mut n_bytes = 0;
    for (i, entry) in entries.iter().enumerate() {
        let entry_bytes = LENGTH_BYTES + entry.as_ref().len();
        if i > start && n_bytes + entry_bytes > run_bytes_max {
            runs.push(&entries[start..i]);
            start = i;
            n_bytes = 0;
        }
        n_bytes += entry_bytes;
    }
    if start < entries.len() {
        runs.push(&entries[start..]);
    }
    runs
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("a run of the Raft log {what}"))
}

fn read_u32(bytes: &[u8], at: usize) -> io::Result<usize> {
    let field = bytes
        .get(at..at + 4)
        .ok_or_else(|| corrupt(&format!("ends inside the length field at byte {at}")))?;
    Ok(u32::from_le_bytes(field.try_into().expect("a slice of four bytes")) as usize)
}

/// The number of entries in a run, read from its header alone.
pub fn len(run: &[u8]) -> io::Result<u64> {
    let n_entries = read_u32(run, 0)?;
    if n_entries == 0 {
        return Err(corrupt("holds no entries"));
    }
    Ok(n_entries as u64)
}

/// The encoded entries of a run, checked against its layout.
pub fn entries(run: &[u8]) -> io::Result<Vec<&[u8]>> {
    let n_entries = len(run)? as usize;
    let mut entries = Vec::with_capacity(n_entries.min(run.len() / LENGTH_BYTES));
    let mut at = COUNT_BYTES;
    for _ in 0..n_entries {
        let entry_len = read_u32(run, at)?;
        at += LENGTH_BYTES;
        let entry = run
            .get(at..at + entry_len)
            .ok_or_else(|| corrupt(&format!("ends inside an entry at byte {at}")))?;
        entries.push(entry);
        at += entry_len;
    }
    if at != run.len() {
        return Err(corrupt(&format!("has {} bytes after its last entry", run.len() - at)));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_reads_back_its_entries_in_order() {
        let written: Vec<Vec<u8>> = vec![b"one".to_vec(), Vec::new(), vec![7; 300]];
        let run = encode(&written);
        assert_eq!(len(&run).unwrap(), 3);
        assert_eq!(entries(&run).unwrap(), written.iter().map(Vec::as_slice).collect::<Vec<_>>());
    }

    #[test]
    fn a_damaged_run_is_an_error_not_a_panic() {
        let run = encode(&[b"first".to_vec(), b"second".to_vec()]);
        for cut in 0..run.len() {
            assert!(entries(&run[..cut]).is_err(), "a run cut at byte {cut} was read");
        }
        let mut longer = run.clone();
        longer.push(0);
        assert!(entries(&longer).is_err());
        assert!(entries(&encode::<Vec<u8>>(&[])).is_err());
        let mut huge_count = run;
        huge_count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(entries(&huge_count).is_err());
    }

    #[test]
    fn splitting_keeps_order_and_the_byte_bound() {
        let entries: Vec<Vec<u8>> = [10, 10, 10, 50, 10].iter().map(|n| vec![1; *n]).collect();
        let runs = split(&entries, 30);
        let sizes: Vec<usize> = runs.iter().map(|run| run.len()).collect();
        // 14 + 14 bytes fit in 30; the 54-byte entry stands alone.
        assert_eq!(sizes, vec![2, 1, 1, 1]);
        assert_eq!(runs.concat(), entries);
        assert_eq!(split(&entries, 1 << 20).len(), 1);
        assert!(split::<Vec<u8>>(&[], 30).is_empty());
    }
}
