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
