use super::*;

#[test]
fn debug_and_display_redact() {
    let s = Secret::new("sk-very-secret");
    assert_eq!(format!("{s:?}"), REDACTED);
    assert_eq!(format!("{s}"), REDACTED);
    assert_eq!(format!("{:?}", Some(&s)), format!("Some({REDACTED})"));
    assert_eq!(s.expose(), "sk-very-secret");
}
