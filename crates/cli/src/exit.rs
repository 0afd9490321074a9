//! Exit codes, documented in the README ("Exit codes").

use coatcheck_core::Status;

/// Success (for `wait`/`submit --wait`: the request succeeded).
pub const OK: i32 = 0;
/// The request ended `failed` (dead-lettered).
pub const FAILED: i32 = 1;
/// The request ended `cancelled`.
pub const CANCELLED: i32 = 3;
/// The request ended `expired`.
pub const EXPIRED: i32 = 4;
/// Waiting timed out; the request is not finished.
pub const TIMED_OUT: i32 = 5;
/// The server refused the call or could not be reached, or the server
/// itself could not start.
pub const ERROR: i32 = 10;

/// The exit code for a request's final status.
pub fn for_status(s: Status) -> i32 {
    match s {
        Status::Succeeded => OK,
        Status::Failed => FAILED,
        Status::Cancelled => CANCELLED,
        Status::Expired => EXPIRED,
        Status::Queued | Status::Running => TIMED_OUT,
    }
}
