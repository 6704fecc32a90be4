//! Progress bars for long loops, hidden unless the caller asks for them.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Destination of the library's progress bars: nowhere (the default, for tests
/// and library users), or a terminal shared with the log output.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl Progress {
    /// Draws no bars.
    pub fn hidden() -> Self {
        Progress { multi: None }
    }

    /// Draws bars on standard error through `multi`.
    pub fn terminal(multi: MultiProgress) -> Self {
        Progress { multi: Some(multi) }
    }

    /// Starts a bar over `len` items, labelled `label`.
    pub fn bar(&self, len: u64, label: &str) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        };
        let style = ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        multi.add(ProgressBar::new(len).with_style(style).with_prefix(label.to_string()))
    }
}
