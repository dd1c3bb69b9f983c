use super::*;

#[test]
fn tokens_are_well_formed_and_distinct() {
    let a = generate_token();
    let b = generate_token();
    assert!(is_well_formed(a.expose()), "{}", a.expose().len());
    assert!(a.expose().starts_with("sess_"));
    assert_eq!(a.expose().len(), 5 + 43);
    assert_ne!(a.expose(), b.expose());
}

#[test]
fn malformed_tokens_are_refused() {
    let good = generate_token();
    let good = good.expose();
    assert!(!is_well_formed(""));
    assert!(!is_well_formed("sess_"));
    assert!(!is_well_formed(&good[..good.len() - 1]));
    assert!(!is_well_formed(&format!("{good}a")));
    assert!(!is_well_formed(&good.replace("sess_", "sesx_")));
    let mut bad = good.to_owned();
    bad.replace_range(10..11, "-");
    assert!(!is_well_formed(&bad));
}

#[test]
fn hash_round_trips_through_hex() {
    let h = TokenHash::of("sess_abc");
    let hex = h.to_hex();
    assert_eq!(hex.len(), 64);
    assert_eq!(TokenHash::from_hex(&hex), Some(h));
    assert_eq!(TokenHash::from_hex("zz"), None);
    assert_eq!(TokenHash::from_hex(&hex.to_uppercase()), None);
    assert_ne!(TokenHash::of("sess_abd"), h);
}

#[test]
fn ids_parse() {
    let id = SessionId::generate();
    assert_eq!(SessionId::parse(id.as_str()), Some(id.clone()));
    assert!(SessionId::parse("sess_x").is_none());
    assert!(SessionId::parse("ses_").is_none());
    assert!(SessionId::parse("ses_a/b").is_none());
}
