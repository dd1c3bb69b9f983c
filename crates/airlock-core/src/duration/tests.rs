use super::*;

#[test]
fn parses_units() {
    assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
    assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
    assert_eq!(parse("1d"), Ok(Duration::from_secs(86_400)));
    assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
    assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse("1s250ms"), Ok(Duration::from_millis(1250)));
    assert_eq!(parse("2m5s"), Ok(Duration::from_secs(125)));
}

#[test]
fn refuses_garbage() {
    for bad in [
        "", "15", "m", "15x", "-5m", "1.5h", "5 m", "ms", "5mss", "30m1h", "1m1m", "1s1m",
        "500ms1s",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_duration_too_large_is_named_as_such() {
    for big in [
        "99999999999999999999s",
        "99999999999999d",
        "213503982335d1h",
    ] {
        assert_eq!(
            parse(big),
            Err(DurationError::TooLarge(big.to_owned())),
            "{big}"
        );
    }
    assert_eq!(parse("15"), Err(DurationError::Invalid("15".to_owned())));
}

#[test]
fn formats_short() {
    assert_eq!(format(Duration::from_secs(5400)), "1h30m");
    assert_eq!(format(Duration::from_secs(45)), "45s");
    assert_eq!(format(Duration::from_secs(0)), "0s");
    assert_eq!(format(Duration::from_secs(90_061)), "1d1h1m1s");
}
