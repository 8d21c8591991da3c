//! Log output. Every field of every line may carry text a pod chose (a path, a header, a query value,
//! an upstream error that echoes them); in the text format such a value must not be able to end the line
//! and write one of its own, so control characters in field values are escaped. The JSON format escapes
//! them by itself.

use std::fmt::{Debug, Write as _};

use pod_identity_api::text::escape_controls;
use tracing::field::Field;
use tracing_subscriber::{
    field::{MakeExt, RecordFields, VisitOutput},
    fmt::format::{self, FormatFields, Writer},
};

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
    }
}
