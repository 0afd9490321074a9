//! Checks of untrusted input that both the server and the SDK apply.

use std::time::Duration;

/// The longest duration accepted anywhere (ten years): beyond it a value is a
/// mistake, not a plan.
pub const MAX_DURATION_SECS: f64 = 315_360_000.0;

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field name as on the wire.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// A new validation failure.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// Queue and channel names: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn name(field: &str, s: &str) -> Result<(), Invalid> {
    let bytes = s.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            "must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
        ))
    }
}

/// A duration in seconds: finite, not negative, at most ten years.
pub fn duration(field: &str, secs: f64) -> Result<Duration, Invalid> {
    if !secs.is_finite() || secs < 0.0 {
        return Err(Invalid::new(
            field,
            "must be a non-negative number of seconds",
        ));
    }
    if secs > MAX_DURATION_SECS {
        return Err(Invalid::new(
            field,
            "must be at most 315360000 seconds (ten years)",
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// An optional duration.
pub fn opt_duration(field: &str, secs: Option<f64>) -> Result<Option<Duration>, Invalid> {
    secs.map(|s| duration(field, s)).transpose()
}

/// A short free-form string such as a correlation id, worker id, metadata key
/// or value: at most `max` bytes, no control characters.
pub fn text(field: &str, s: &str, max: usize) -> Result<(), Invalid> {
    if s.len() > max {
        return Err(Invalid::new(field, format!("must be at most {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// A request id as the server issues it (UUID text). Anything else cannot
/// name a request.
pub fn request_id(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "A9", "thumb.nails_v2-x", &"a".repeat(128)] {
            assert!(name("queue", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "ä", "a/b", &"a".repeat(129)] {
            assert!(name("queue", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration("d", 0.3).unwrap(), Duration::from_millis(300));
        assert!(duration("d", -0.1).is_err());
        assert!(duration("d", f64::NAN).is_err());
        assert!(duration("d", f64::INFINITY).is_err());
        assert!(duration("d", 1e12).is_err());
    }

    #[test]
    fn ids() {
        assert!(request_id("0193f2c4-7b1e-7c4a-9f0e-3b5d2a1c9e77"));
        assert!(!request_id("nope"));
        assert!(!request_id("0193f2c47b1e7c4a9f0e3b5d2a1c9e77"));
    }
}
