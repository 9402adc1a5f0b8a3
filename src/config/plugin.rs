//! The config of flowgate inside Mosquitto (`flowgate-mosquitto`, a broker
//! plugin): flowgate's own TOML, less what only the proxy uses. A plugin does
//! share mode inside the broker, so a file for it holds `node_id`, `[admin]`
//! and `[[instance]]` with `name`, `match`, `broadcast` (and `max_replicas`);
//! any other key is refused by name, so that a proxy's file handed to the
//! plugin says what it would ignore instead of running half of it.

use std::path::Path;

use super::{Config, ConfigError, ConfigProblem};

/// Top-level keys a plugin config may hold.
const TOP: &[&str] = &["node_id", "admin", "instance"];
/// Keys of an `[[instance]]` table in a plugin config.
const INSTANCE: &[&str] = &["name", "match", "broadcast", "max_replicas"];

/// The keys of `text` that only the proxy uses, each with its path
/// (`mqtt`, `instance[0].http`). Text that is not TOML has none: the full
/// parse reports it.
pub fn proxy_only_keys(text: &str) -> Vec<String> {
    let Ok(table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut keys: Vec<String> = table
        .keys()
        .filter(|k| !TOP.contains(&k.as_str()))
        .cloned()
        .collect();
    if let Some(toml::Value::Array(instances)) = table.get("instance") {
        for (i, instance) in instances.iter().enumerate() {
            if let toml::Value::Table(t) = instance {
                keys.extend(
                    t.keys()
                        .filter(|k| !INSTANCE.contains(&k.as_str()))
                        .map(|k| format!("instance[{i}].{k}")),
                );
            }
        }
    }
    keys
}

impl Config {
    /// Reads and validates a config for the Mosquitto plugin: refused with
    /// every proxy-only key named, then validated as any flowgate config.
    pub fn load_plugin(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        Self::parse_plugin(&text, &origin)
    }

    /// As [`Config::load_plugin`], for text; `origin` names it in errors.
    pub fn parse_plugin(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let problems: Vec<ConfigProblem> = proxy_only_keys(text)
            .into_iter()
            .map(|path| ConfigProblem {
                path,
                message: "only the flowgate proxy uses this key; a config for the Mosquitto \
                          plugin has node_id, [admin] and [[instance]] with name, match, \
                          broadcast and max_replicas"
                    .to_owned(),
            })
            .collect();
        if !problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: origin.to_owned(),
                problems,
            });
        }
        let mut config = Self::parse(text, origin)?;
        // what the admin API reports: share mode, inside the broker
        config.mqtt.mode = super::Mode::Share;
        config.mqtt.upstream = super::Upstream::Host;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "node_id = \"b1\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
        [[instance]]\nname = \"line1\"\nmatch = { client_id = \"nr\" }\nbroadcast = [\"config/#\"]\n";

    #[test]
    fn a_plugin_config_is_a_flowgate_config() {
        let config = Config::parse_plugin(GOOD, "t").expect("valid");
        assert_eq!(config.node_id, "b1");
        assert_eq!(config.instances[0].name, "line1");
        assert_eq!(config.instances[0].broadcast[0].as_str(), "config/#");
        assert_eq!(config.mqtt.mode, crate::config::Mode::Share);
        assert_eq!(config.mqtt.upstream.to_string(), "mosquitto-plugin");
    }

    #[test]
    fn proxy_only_keys_are_refused_by_name() {
        let text = format!(
            "{GOOD}http = {{ listen = \"127.0.0.1:0\", replicas = [\"127.0.0.1:1880\"] }}\n\
             strategy = \"round-robin\"\n[mqtt]\nupstream = \"mqtt://127.0.0.1:1883\"\n"
        );
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse_plugin(&text, "t") else {
            panic!("a proxy key passed");
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["mqtt", "instance[0].http", "instance[0].strategy"]);
        assert!(problems[0].message.contains("only the flowgate proxy"));
    }

    #[test]
    fn other_problems_are_the_usual_ones() {
        let text = "[[instance]]\nname = \"line1\"\n";
        let e = Config::parse_plugin(text, "t").expect_err("no match rule");
        assert!(e.to_string().contains("match"), "{e}");
        assert!(matches!(
            Config::parse_plugin("node_id = ", "t"),
            Err(ConfigError::Parse { .. })
        ));
    }
}
