//! Completion acknowledgement: the key a job and its result share
//! (`complete.correlate`). Pure.

use super::wire::Message;
use crate::config::Correlate;

/// A JSON payload up to this size is read for a `json:` key; a larger one
/// has none (the job falls back to acknowledgement on receipt).
pub const MAX_JSON: usize = 1 << 20;

/// The key `msg` carries under `correlate`: a topic level, a top-level JSON
/// field (a string's text, a number's or boolean's JSON text, so `"7"` and
/// `7` match), or the MQTT 5 correlation data. `None` when it has none (the
/// level or field is missing or empty, the payload is no JSON object, or too
/// large).
pub fn key(correlate: &Correlate, msg: &Message) -> Option<Vec<u8>> {
    let key = match correlate {
        Correlate::TopicLevel(n) => msg.topic.split('/').nth(*n)?.as_bytes().to_vec(),
        Correlate::CorrelationData => msg
            .properties
            .as_deref()?
            .correlation_data
            .as_ref()?
            .to_vec(),
        Correlate::JsonField(field) => {
            if msg.payload.len() > MAX_JSON {
                return None;
            }
            let value: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
            match value.get(field)? {
                serde_json::Value::String(s) => s.as_bytes().to_vec(),
                v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                    v.to_string().into_bytes()
                }
                _ => return None,
            }
        }
    };
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &str, corr: Option<&str>) -> Message {
        Message {
            topic: topic.into(),
            payload: Bytes::from(payload.to_owned()),
            qos: crate::mqtt::dispatch::wire::QoS::AtLeastOnce,
            retain: false,
            properties: corr.map(|c| {
                Box::new(rumqttc::v5::mqttbytes::v5::PublishProperties {
                    correlation_data: Some(Bytes::from(c.to_owned())),
                    ..Default::default()
                })
            }),
        }
    }

    #[test]
    fn a_job_and_its_result_share_a_key() {
        let level: Correlate = "topic:1".parse().expect("parses");
        assert_eq!(
            key(&level, &msg("jobs/123", "", None)),
            Some(b"123".to_vec())
        );
        assert_eq!(
            key(&level, &msg("done/123/x", "", None)),
            Some(b"123".to_vec())
        );
        assert_eq!(key(&level, &msg("jobs", "", None)), None);
        assert_eq!(key(&level, &msg("jobs//x", "", None)), None);

        let field: Correlate = "json:id".parse().expect("parses");
        let job = key(&field, &msg("jobs", r#"{"id": 7, "x": [1]}"#, None));
        let result = key(&field, &msg("done", r#"{"id": "7"}"#, None));
        assert_eq!(job, Some(b"7".to_vec()));
        assert_eq!(job, result, "a number and its text match");
        for payload in [
            r#"{"x": 1}"#,
            r#"{"id": null}"#,
            r#"{"id": {}}"#,
            "[1]",
            "not json",
            "",
        ] {
            assert_eq!(key(&field, &msg("jobs", payload, None)), None, "{payload}");
        }
        let huge = format!(r#"{{"id": 1, "pad": "{}"}}"#, "x".repeat(MAX_JSON));
        assert_eq!(
            key(&field, &msg("jobs", &huge, None)),
            None,
            "over MAX_JSON"
        );

        let corr: Correlate = "correlation-data".parse().expect("parses");
        assert_eq!(
            key(&corr, &msg("jobs", "", Some("\u{0}c1"))),
            Some(b"\0c1".to_vec())
        );
        assert_eq!(key(&corr, &msg("jobs", "", None)), None);
    }

    #[test]
    fn correlate_names_one_of_three_forms() {
        for bad in [
            "topic:",
            "topic:x",
            "json:",
            "header:a",
            "",
            "correlation_data",
        ] {
            assert!(bad.parse::<Correlate>().is_err(), "{bad}");
        }
        for good in ["topic:0", "json:id", "correlation-data"] {
            let c: Correlate = good.parse().expect("parses");
            assert_eq!(c.to_string(), good);
        }
    }
}
