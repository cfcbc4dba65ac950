//! The open-file limit: thousands of WebSocket connections need thousands of descriptors.

/// Raises this process's soft limit on open files to at least `wanted` when the hard limit
/// allows (or can be raised: a privileged process raises it too) (children started afterwards inherit it). Returns the limit now in force, and
/// prints a line when it stays below `wanted`, so that a test or benchmark that then runs
/// out of descriptors says why.
pub fn raise_open_files(wanted: u64) -> u64 {
    // A privileged process (CAP_SYS_RESOURCE) may raise the hard limit itself; for any other
    // this fails and the soft limit goes up to the hard one below.
    if let Ok((soft, hard)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && soft < wanted
        && hard < wanted
    {
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, wanted, wanted);
    }
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit >= wanted => limit,
        Ok(limit) => {
            eprintln!(
                "the open-file limit is {limit}, below the {wanted} wanted, and the hard limit does not allow more: raise it (ulimit -Hn) to run at full size"
            );
            limit
        }
        Err(error) => {
            eprintln!("could not raise the open-file limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(0)
        }
    }
}
