//! The bundled broker (the embedded rumqttd) on its own: what a broker must
//! survive from its clients.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// CONNECT 3.1.1, clean session, keep-alive 30 s.
fn connect_v4(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);
    frame
}

/// Connects, sends CONNECT and waits for the CONNACK's first byte.
async fn connack(addr: SocketAddr, id: &str) -> Result<u8, String> {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        s.write_all(&connect_v4(id))
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        let _ = s.write_all(&[0xe0, 0x00]).await;
        Ok(head[0])
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .map_err(|_| "no CONNACK within 5 s".to_string())?
}

/// rumqttd 0.20 (bytebeamio/rumqtt#1062): a client that resets its
/// connection before its CONNACK is written leaves its client id behind;
/// the next CONNECT with that id panicked while holding a lock, and from then
/// on every connection to that listener panicked: one broken client took the
/// bundled broker down for everyone. flowgate builds a patched copy
/// (vendor/rumqttd).
#[tokio::test]
async fn a_client_reset_during_its_handshake_does_not_take_the_broker_down() {
    let broker = flowgate::broker::start(1 << 20)
        .await
        .expect("broker starts");
    for round in 0..20 {
        // CONNECT then an immediate reset (SO_LINGER 0): the CONNACK finds the
        // socket gone
        let s = TcpStream::connect(broker.v4).await.expect("connects");
        s.set_zero_linger().expect("linger");
        let mut s = s;
        s.write_all(&connect_v4("device-7")).await.expect("writes");
        drop(s);
        // the same id again, then another client: both get their CONNACK
        for id in ["device-7", "bystander"] {
            let first = connack(broker.v4, id)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {id}: {e}"));
            assert_eq!(first, 0x20, "round {round}: {id} got a CONNACK");
        }
    }
}
