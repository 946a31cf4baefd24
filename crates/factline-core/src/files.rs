//! Files factline creates.

/// Creates the database file at `path`, readable and writable by its owner
/// only, unless it exists. SQLite gives the WAL and shared-memory files it
/// creates beside it the same mode; events often hold personal data, so no
/// other local user may read them. Every factline SQLite file is opened
/// through here first.
pub fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
