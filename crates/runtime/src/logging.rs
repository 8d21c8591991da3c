//! Log output of the binaries: one JSON object per line, or text.
//!
//! Every field of every line may carry text from outside (a pod's path, header or query value; an Azure
//! error that echoes them; an object's name): in the text format such a value must not be able to end
//! the line and write one of its own, so control characters in field values are escaped
//! ([`EscapedFields`]). The JSON format escapes them by itself. Lines go to standard error.

use std::fmt::{Debug, Write as _};

use pod_identity_api::text::escape_controls;
use tracing::field::Field;
use tracing_subscriber::{
    EnvFilter,
    field::{MakeExt, RecordFields, VisitOutput},
    fmt::format::{self, FormatFields, Writer},
};

/// Log line format (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, the event's fields at the top level with those of its spans.
    Json,
    /// Human-readable lines (`plain` is the same).
    #[value(alias = "plain")]
    Text,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("the log filter {filter:?} is not valid: {source}")]
pub struct FilterError {
    filter: String,
    source: tracing_subscriber::filter::ParseError,
}

/// The filter: `RUST_LOG` when set, `default` otherwise (tracing's `EnvFilter` syntax, e.g.
/// `info,kube=warn`).
pub fn filter(default: &str) -> Result<EnvFilter, FilterError> {
    EnvFilter::try_from_default_env().or_else(|_| {
        EnvFilter::try_new(default).map_err(|source| FilterError {
            filter: default.to_owned(),
            source,
        })
    })
}

/// Installs the process's log output: `format`, lines filtered by [`filter`]`(default_filter)`, to
/// standard error.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), FilterError> {
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter(default_filter)?)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => subscriber.json().flatten_event(true).with_span_list(false).init(),
        LogFormat::Text => subscriber.fmt_fields(EscapedFields).init(),
    }
    Ok(())
}

/// The field formatter of the text format: `name=value` pairs separated by spaces, the message bare,
/// every value with its control characters escaped ([`escape_controls`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct EscapedFields;

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> std::fmt::Result {
        let fields_fn = format::debug_fn(escaped_field).delimited(" ");
        let mut visitor = tracing_subscriber::field::MakeVisitor::make_visitor(&fields_fn, writer);
        fields.record(&mut visitor);
        visitor.finish()
    }
}

fn escaped_field(writer: &mut Writer<'_>, field: &Field, value: &dyn Debug) -> std::fmt::Result {
    let mut text = String::new();
    write!(text, "{value:?}")?;
    let text = escape_controls(&text);
    if field.name() == "message" {
        writer.write_str(&text)
    } else {
        write!(writer, "{}={text}", field.name())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use clap::ValueEnum;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_value_with_a_line_break_cannot_forge_a_line_in_the_text_format() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .with_writer(move || writer.clone())
            .finish();
        // The example of the report: a resource whose upstream error echoes it back into the log.
        let error = "refused (400 invalid_resource): AADSTS500011: The resource principal named x\n2026-11-30T00:00:00Z  INFO forged line was not found";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", pod = "ns/web\n2026-11-30T00:00:00Z  INFO forged span");
            let _entered = span.enter();
            tracing::warn!(resource = "x\n2026-11-30T00:00:00Z  INFO forged", %error, path = %"/a\r\nb", "no token from upstream");
        });
        let out = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(
            out.contains("INFO forged line"),
            "the text is kept, escaped: {out}"
        );
        assert!(out.contains("no token from upstream"), "{out}");
        assert!(out.contains(r"principal named x\n2026"), "{out}");
        assert!(
            out.contains("INFO forged span"),
            "span fields are kept, escaped: {out}"
        );
    }

    #[test]
    fn both_binaries_spellings_of_the_text_format_are_accepted() {
        assert_eq!(LogFormat::from_str("plain", false), Ok(LogFormat::Text));
        assert_eq!(LogFormat::from_str("text", false), Ok(LogFormat::Text));
        assert_eq!(LogFormat::from_str("json", false), Ok(LogFormat::Json));
    }
}
