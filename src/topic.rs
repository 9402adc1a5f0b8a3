//! Topic filters: validation, matching a topic, and one filter covering another.
//! Pure; used by config validation, share-mode rewriting and dispatch.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

/// A valid MQTT topic filter (wildcards `+` and `#` in whole levels only).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TopicFilter(String);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("a topic filter cannot be empty")]
    Empty,
    #[error("a topic filter is at most 65535 bytes")]
    TooLong,
    #[error("'#' must be a whole level and the last one")]
    BadMultiLevel,
    #[error("'+' must be a whole level")]
    BadSingleLevel,
    #[error("a topic filter cannot contain NUL")]
    Nul,
}

impl TopicFilter {
    pub fn new(filter: &str) -> Result<Self, FilterError> {
        validate(filter)?;
        Ok(Self(filter.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Does `topic` (a topic name, no wildcards) match this filter? Topics
    /// starting with `$` match no filter starting with a wildcard.
    pub fn matches(&self, topic: &str) -> bool {
        matches(&self.0, topic)
    }

    /// Does every topic that matches `other` also match `self`?
    pub fn covers(&self, other: &str) -> bool {
        covers(&self.0, other)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks the MQTT rules for a topic filter.
pub fn validate(filter: &str) -> Result<(), FilterError> {
    if filter.is_empty() {
        return Err(FilterError::Empty);
    }
    if filter.len() > usize::from(u16::MAX) {
        return Err(FilterError::TooLong);
    }
    if filter.contains('\0') {
        return Err(FilterError::Nul);
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(FilterError::BadMultiLevel);
        }
        if level.contains('+') && level != "+" {
            return Err(FilterError::BadSingleLevel);
        }
    }
    Ok(())
}

/// Topic-name against filter matching as MQTT defines it.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Filter coverage: `general` covers `specific` when every topic matched by
/// `specific` is matched by `general`.
pub fn covers(general: &str, specific: &str) -> bool {
    if specific.starts_with('$') && (general.starts_with('+') || general.starts_with('#')) {
        return false;
    }
    let mut g = general.split('/');
    let mut s = specific.split('/');
    loop {
        match (g.next(), s.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(sl)) if sl != "#" => {}
            (Some(gl), Some(sl)) if gl == sl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_wildcard_placement() {
        for ok in ["a", "a/b", "+", "#", "a/+/b", "a/#", "/", "+/+", "$SYS/#"] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate(""), Err(FilterError::Empty));
        assert_eq!(validate("a/#/b"), Err(FilterError::BadMultiLevel));
        assert_eq!(validate("a#"), Err(FilterError::BadMultiLevel));
        assert_eq!(validate("a+/b"), Err(FilterError::BadSingleLevel));
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn coverage() {
        assert!(covers("config/#", "config/#"));
        assert!(covers("config/#", "config/a/+"));
        assert!(covers("config/+", "config/a"));
        assert!(!covers("config/+", "config/#"));
        assert!(!covers("config/a", "config/+"));
        assert!(covers("#", "a/b"));
        assert!(!covers("#", "$SYS/a"));
        assert!(!covers("jobs/#", "config/a"));
    }
}
