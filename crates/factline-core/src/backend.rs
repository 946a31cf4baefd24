//! The plumbing every backend shares, apart from what applications use:
//! the append rules (`validate_append`, `resolve_duplicates`,
//! `resolve_command`), the single-writer queue with group commit
//! ([`writer_queue`]), the size of a bounded read's steps, and how store
//! files are created. A new backend builds on these so that it behaves
//! like the others; the conformance suite checks it does.

pub mod writer_queue;

pub use crate::append::{
    resolve_duplicates, validate_append, EncodedEvent, ExistingEvent, StoredContent,
};
pub use crate::command::{resolve_command, retention_cutoff};
pub use crate::files::create_private_file;
pub use crate::json::check_readable;
pub use crate::store::BOUNDED_CHUNK;
