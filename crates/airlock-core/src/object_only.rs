//! [`ObjectOnly`]: a struct read from a JSON object and from nothing else.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{value::MapAccessDeserializer, Deserialize, Deserializer, MapAccess, Visitor};

/// A `T` deserialised from a map (a JSON object) only. A struct whose
/// `Deserialize` serde derives also takes a sequence of its fields, read
/// by position: `"limits": [5, 1, 2]` would set limits in an order its
/// sender never named. What arrives from outside goes through this.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectOnly<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_map(Object(PhantomData))
            .map(ObjectOnly)
    }
}

/// Takes a map and hands it to `T`; anything else is the wrong type.
struct Object<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for Object<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        a: u32,
        #[serde(default)]
        b: Option<u32>,
    }

    #[test]
    fn takes_an_object() {
        let ObjectOnly(pair) =
            serde_json::from_str::<ObjectOnly<Pair>>(r#"{"a": 1, "b": 2}"#).unwrap();
        assert_eq!(pair, Pair { a: 1, b: Some(2) });
        let ObjectOnly(pair) = serde_json::from_str::<ObjectOnly<Pair>>(r#"{"a": 1}"#).unwrap();
        assert_eq!(pair, Pair { a: 1, b: None });
    }

    #[test]
    fn refuses_the_fields_as_an_array() {
        // What the derived impl alone accepts.
        assert!(serde_json::from_str::<Pair>("[1, 2]").is_ok());
        for text in ["[1, 2]", "[]", "1", "\"a\"", "null"] {
            let err = serde_json::from_str::<ObjectOnly<Pair>>(text).unwrap_err();
            assert!(
                err.to_string().contains("expected an object"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn keeps_the_struct_own_checks() {
        let err = serde_json::from_str::<ObjectOnly<Pair>>(r#"{"a": 1, "c": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `c`"), "{err}");
        let err = serde_json::from_str::<ObjectOnly<Pair>>(r#"{"b": 3}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `a`"), "{err}");
    }
}
