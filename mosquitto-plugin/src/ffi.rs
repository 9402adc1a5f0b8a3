//! The part of Mosquitto 2.1's plugin API (plugin interface version 5) that
//! flowgate uses, written by hand from `include/mosquitto/broker.h`,
//! `broker_plugin.h` and `defs.h`. The struct layouts are checked against the
//! real header by this module's test (a C file of `_Static_assert`s on every
//! size and offset used here, compiled with the system C compiler).

use std::ffi::{c_char, c_int, c_void};

/// The plugin interface version this plugin speaks.
pub const PLUGIN_VERSION: c_int = 5;

pub const MOSQ_ERR_SUCCESS: c_int = 0;
pub const MOSQ_ERR_UNKNOWN: c_int = 13;
pub const MOSQ_ERR_PLUGIN_IGNORE: c_int = 32;
pub const MOSQ_ERR_SERVER_BUSY: c_int = 137;

pub const MOSQ_EVT_RELOAD: c_int = 1;
pub const MOSQ_EVT_BASIC_AUTH: c_int = 3;
pub const MOSQ_EVT_MESSAGE_IN: c_int = 7;
pub const MOSQ_EVT_DISCONNECT: c_int = 10;
pub const MOSQ_EVT_CONNECT: c_int = 11;
pub const MOSQ_EVT_SUBSCRIBE: c_int = 12;
pub const MOSQ_EVT_UNSUBSCRIBE: c_int = 13;
pub const MOSQ_EVT_MESSAGE_OUT: c_int = 27;
pub const MOSQ_EVT_CLIENT_OFFLINE: c_int = 28;

pub const MOSQ_LOG_INFO: c_int = 1 << 0;
pub const MOSQ_LOG_NOTICE: c_int = 1 << 1;
pub const MOSQ_LOG_WARNING: c_int = 1 << 2;
pub const MOSQ_LOG_ERR: c_int = 1 << 3;

/// `struct mosquitto`: opaque.
#[repr(C)]
pub struct Client {
    _private: [u8; 0],
}

/// `mosquitto_plugin_id_t`: opaque.
#[repr(C)]
pub struct PluginId {
    _private: [u8; 0],
}

/// `struct mosquitto_opt`: one `plugin_opt_*` line.
#[repr(C)]
pub struct Opt {
    pub key: *mut c_char,
    pub value: *mut c_char,
}

/// `struct mosquitto_evt_reload`.
#[repr(C)]
pub struct EvtReload {
    pub future: *mut c_void,
    pub options: *mut Opt,
    pub option_count: c_int,
    pub future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_basic_auth`.
#[repr(C)]
pub struct EvtBasicAuth {
    pub future: *mut c_void,
    pub client: *mut Client,
    pub username: *mut c_char,
    pub password: *mut c_char,
    pub future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_message` (MESSAGE_IN and MESSAGE_OUT).
#[repr(C)]
pub struct EvtMessage {
    pub future: *mut c_void,
    pub client: *mut Client,
    pub topic: *mut c_char,
    pub payload: *mut c_void,
    pub properties: *mut c_void,
    pub reason_string: *mut c_char,
    pub payloadlen: u32,
    pub qos: u8,
    pub reason_code: u8,
    pub retain: bool,
    pub padding: u8,
    pub future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_connect`.
#[repr(C)]
pub struct EvtConnect {
    pub future: *mut c_void,
    pub client: *mut Client,
    pub future2: [*mut c_void; 4],
}

/// `struct mosquitto_evt_disconnect` and `struct mosquitto_evt_client_offline`.
#[repr(C)]
pub struct EvtDisconnect {
    pub future: *mut c_void,
    pub client: *mut Client,
    pub reason: c_int,
    pub future2: [*mut c_void; 4],
}

/// `struct mosquitto_subscription`.
#[repr(C)]
pub struct Subscription {
    pub clientid: *mut c_char,
    pub topic_filter: *mut c_char,
    pub properties: *mut c_void,
    pub identifier: u32,
    pub options: u8,
    pub padding: [u8; 3],
    pub future2: [*mut c_void; 8],
}

/// `struct mosquitto_evt_subscribe` and `struct mosquitto_evt_unsubscribe`:
/// the broker frees `data.topic_filter` when a callback replaces it, and frees
/// the replacement later, both with `mosquitto_free`: a new filter must come
/// from `mosquitto_strdup`.
#[repr(C)]
pub struct EvtSubscribe {
    pub future: *mut c_void,
    pub client: *mut Client,
    pub data: Subscription,
    pub future2: [*mut c_void; 8],
}

/// `MOSQ_FUNC_generic_callback`.
pub type Callback =
    unsafe extern "C" fn(event: c_int, event_data: *mut c_void, userdata: *mut c_void) -> c_int;

// Resolved in the broker process when Mosquitto loads the plugin.
extern "C" {
    pub fn mosquitto_plugin_set_info(
        id: *mut PluginId,
        name: *const c_char,
        version: *const c_char,
    ) -> c_int;
    pub fn mosquitto_callback_register(
        id: *mut PluginId,
        event: c_int,
        cb: Callback,
        event_data: *const c_void,
        userdata: *mut c_void,
    ) -> c_int;
    pub fn mosquitto_callback_unregister(
        id: *mut PluginId,
        event: c_int,
        cb: Callback,
        event_data: *const c_void,
    ) -> c_int;
    pub fn mosquitto_log_printf(level: c_int, fmt: *const c_char, ...);
    pub fn mosquitto_client_id(client: *const Client) -> *const c_char;
    pub fn mosquitto_client_address(client: *const Client) -> *const c_char;
    pub fn mosquitto_client_protocol_version(client: *const Client) -> c_int;
    pub fn mosquitto_set_clientid(client: *mut Client, clientid: *const c_char) -> c_int;
    pub fn mosquitto_strdup(s: *const c_char) -> *mut c_char;
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;

    /// `include/` of the Mosquitto 2.1.2 source: `MOSQUITTO_INCLUDE`, or the
    /// build `tests/mosquitto21/build.sh` keeps (built there once if missing).
    fn include_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("MOSQUITTO_INCLUDE") {
            return dir.into();
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/mosquitto21/build.sh");
        let out = Command::new("bash")
            .arg(script)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "building Mosquitto 2.1.2 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let broker = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // .../src/build/src/mosquitto -> .../src/include
        broker
            .ancestors()
            .nth(3)
            .expect("the build's layout")
            .join("include")
    }

    /// Every size and offset the Rust side relies on, as C assertions.
    fn assertions() -> String {
        let mut c = String::new();
        let mut check = |expr: String, value: usize| {
            c.push_str(&format!("_Static_assert({expr} == {value}, \"{expr}\");\n"));
        };
        macro_rules! layout {
            ($ty:ty, $c:literal, [$($field:ident),*]) => {
                check(format!("sizeof(struct {})", $c), size_of::<$ty>());
                $(check(format!("offsetof(struct {}, {})", $c, stringify!($field)), offset_of!($ty, $field));)*
            };
        }
        layout!(Opt, "mosquitto_opt", [key, value]);
        layout!(EvtReload, "mosquitto_evt_reload", [options, option_count]);
        layout!(
            EvtBasicAuth,
            "mosquitto_evt_basic_auth",
            [client, username, password]
        );
        layout!(
            EvtMessage,
            "mosquitto_evt_message",
            [client, topic, payload, properties, payloadlen, qos, retain]
        );
        layout!(EvtConnect, "mosquitto_evt_connect", [client]);
        layout!(EvtDisconnect, "mosquitto_evt_disconnect", [client, reason]);
        layout!(
            EvtDisconnect,
            "mosquitto_evt_client_offline",
            [client, reason]
        );
        layout!(
            Subscription,
            "mosquitto_subscription",
            [clientid, topic_filter, properties, identifier, options]
        );
        layout!(EvtSubscribe, "mosquitto_evt_subscribe", [client, data]);
        layout!(EvtSubscribe, "mosquitto_evt_unsubscribe", [client, data]);
        for (name, value) in [
            ("MOSQ_ERR_SUCCESS", MOSQ_ERR_SUCCESS),
            ("MOSQ_ERR_UNKNOWN", MOSQ_ERR_UNKNOWN),
            ("MOSQ_ERR_PLUGIN_IGNORE", MOSQ_ERR_PLUGIN_IGNORE),
            ("MOSQ_ERR_SERVER_BUSY", MOSQ_ERR_SERVER_BUSY),
            ("MOSQ_EVT_RELOAD", MOSQ_EVT_RELOAD),
            ("MOSQ_EVT_BASIC_AUTH", MOSQ_EVT_BASIC_AUTH),
            ("MOSQ_EVT_MESSAGE_IN", MOSQ_EVT_MESSAGE_IN),
            ("MOSQ_EVT_DISCONNECT", MOSQ_EVT_DISCONNECT),
            ("MOSQ_EVT_CONNECT", MOSQ_EVT_CONNECT),
            ("MOSQ_EVT_SUBSCRIBE", MOSQ_EVT_SUBSCRIBE),
            ("MOSQ_EVT_UNSUBSCRIBE", MOSQ_EVT_UNSUBSCRIBE),
            ("MOSQ_EVT_MESSAGE_OUT", MOSQ_EVT_MESSAGE_OUT),
            ("MOSQ_EVT_CLIENT_OFFLINE", MOSQ_EVT_CLIENT_OFFLINE),
            ("MOSQ_LOG_INFO", MOSQ_LOG_INFO),
            ("MOSQ_LOG_NOTICE", MOSQ_LOG_NOTICE),
            ("MOSQ_LOG_WARNING", MOSQ_LOG_WARNING),
            ("MOSQ_LOG_ERR", MOSQ_LOG_ERR),
        ] {
            c.push_str(&format!("_Static_assert({name} == {value}, \"{name}\");\n"));
        }
        c
    }

    #[test]
    fn bindings_match_the_mosquitto_2_1_header() {
        let include = include_dir();
        let dir = std::env::temp_dir().join(format!("flowgate-ffi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("layout.c");
        let source = format!(
            "#include <stddef.h>\n#include <mosquitto.h>\n#include <mosquitto/broker.h>\n\
             #include <mosquitto/broker_plugin.h>\n{}",
            assertions()
        );
        std::fs::write(&file, source).expect("write the C check");
        let out = Command::new("cc")
            .arg("-fsyntax-only")
            .arg("-I")
            .arg(&include)
            .arg(&file)
            .output()
            .expect("a C compiler (cc)");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "the bindings differ from {}:\n{}",
            include.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
