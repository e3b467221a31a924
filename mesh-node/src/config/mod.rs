//! Kubernetes-style YAML configuration: parsing with errors that name the file, line, object
//! and field (`parse`), and a watched folder that keeps the last good version of everything
//! (`watch`).

#![forbid(unsafe_code)]

pub mod parse;
pub mod watch;

use std::fmt;
use std::path::PathBuf;

/// A problem with one piece of configuration. Displays as
/// `FILE:LINE: KIND NS/NAME: FIELD: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    /// `Pod mesh/a`, when known.
    pub object: Option<String>,
    /// Dotted path of the field, when known (`status.podIP`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(o) = &self.object {
            write!(f, "{o}: ")?;
        }
        if let Some(p) = &self.field {
            write!(f, "{p}: ")?;
        }
        f.write_str(&self.message)
    }
}
