//! Redis's own counts, from `INFO`: what a section cost the server.

use hybrid_cluster_test_support::BoxError;

/// Redis's `INFO` of `section` (`memory`, `stats`, `all`…).
pub(crate) async fn redis_info(section: &str) -> Result<String, BoxError> {
    let client = redis::Client::open(hybrid_cluster_test_support::servers::redis_url())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("INFO")
        .arg(section)
        .query_async(&mut connection)
        .await?)
}

/// The number after `name:` in `info`: `used_memory:123`, or the calls of
/// `cmdstat_eval:calls=4,usec=…`.
pub(crate) fn info_number(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|rest| rest.strip_prefix("calls=").unwrap_or(rest))
        .and_then(|rest| rest.split(',').next())
        .and_then(|number| number.trim().parse().ok())
}
