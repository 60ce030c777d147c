//! `vigil.QueryRequest` (`string query = 1`), written by hand instead of
//! generated: a query that is not UTF-8 is repaired, its invalid bytes read
//! as `?`, as the same query in a Riemann TCP frame is ([`wire::repair_utf8`]).
//!
//! prost refuses such a string while tonic decodes the request, before the
//! service sees it, and tonic then answers `INTERNAL`: a client's bad byte
//! read as vigil's own failure, and uncounted. For the same reason a request
//! that is not protobuf at all decodes, as [`QueryRequest::malformed`], for
//! the service to refuse as the client's error.

use bytes::{Buf, BufMut};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};

use crate::wire;

/// The field number of `query`.
const QUERY: u32 = 1;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct QueryRequest {
    /// A Riemann query, e.g. `service =~ "cpu%" and metric > 0.9`.
    pub query: String,
    /// Whether `query` arrived with bytes that are not UTF-8 (now `?`).
    repaired: bool,
    /// Why the request as sent was not a `QueryRequest`.
    malformed: Option<String>,
}

impl QueryRequest {
    pub fn new(query: impl Into<String>) -> QueryRequest {
        QueryRequest {
            query: query.into(),
            repaired: false,
            malformed: None,
        }
    }

    /// Why the request's bytes were not a `QueryRequest`, if they were not.
    pub fn malformed(&self) -> Option<&str> {
        self.malformed.as_deref()
    }

    /// Whether the query as sent was not UTF-8 and was repaired.
    pub fn repaired(&self) -> bool {
        self.repaired
    }
}

impl std::fmt::Debug for QueryRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryRequest")
            .field("query", &self.query)
            .finish()
    }
}

impl prost::Message for QueryRequest {
    /// prost's loop, but a field that does not decode ends the request as
    /// malformed instead of failing the decode.
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), DecodeError> {
        let ctx = DecodeContext::default();
        while buf.has_remaining() {
            let field = decode_key(&mut buf).and_then(|(tag, wire_type)| {
                self.merge_field(tag, wire_type, &mut buf, ctx.clone())
            });
            if let Err(e) = field {
                self.malformed = Some(e.to_string());
                buf.advance(buf.remaining());
            }
        }
        Ok(())
    }

    fn encode_raw(&self, buf: &mut impl BufMut) {
        if !self.query.is_empty() {
            prost::encoding::string::encode(QUERY, &self.query, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != QUERY {
            return skip_field(wire_type, tag, buf, ctx);
        }
        // A repeated scalar field: the last one counts, as prost's would.
        let mut bytes = Vec::new();
        prost::encoding::bytes::merge(wire_type, &mut bytes, buf, ctx)?;
        (self.query, self.repaired) = wire::repaired_string(bytes);
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        if self.query.is_empty() {
            0
        } else {
            prost::encoding::string::encoded_len(QUERY, &self.query)
        }
    }

    fn clear(&mut self) {
        *self = QueryRequest::default();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// What prost generates for `string query = 1`, to compare with.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(string, tag = "1")]
        query: String,
    }

    #[test]
    fn encodes_and_decodes_as_the_generated_message() {
        for query in ["", "service = \"cpu\"", "host =~ \"é%\""] {
            let ours = QueryRequest::new(query);
            let generated = Generated {
                query: query.into(),
            };
            assert_eq!(ours.encode_to_vec(), generated.encode_to_vec());
            let back = QueryRequest::decode(generated.encode_to_vec().as_slice()).unwrap();
            assert_eq!(back, ours);
            assert!(!back.repaired());
        }
        // Unknown fields skipped, the last `query` kept.
        let mut bytes = Vec::new();
        prost::encoding::uint64::encode(7, &3, &mut bytes);
        prost::encoding::string::encode(1, &"first".to_owned(), &mut bytes);
        prost::encoding::string::encode(1, &"last".to_owned(), &mut bytes);
        assert_eq!(
            QueryRequest::decode(bytes.as_slice()).unwrap().query,
            "last"
        );
    }

    #[test]
    fn bytes_that_are_not_a_query_request_decode_as_malformed() {
        let malformed = |bytes: &[u8]| QueryRequest::decode(bytes).unwrap().malformed;
        let wire_type_7 = "failed to decode Protobuf message: invalid wire type value: 7";
        assert_eq!(
            malformed(&[0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap(),
            wire_type_7
        );
        // `query` as a varint.
        let wrong_type = malformed(&[0x08, 0x01]).unwrap();
        assert!(wrong_type.contains("invalid wire type"), "{wrong_type}");
        // A length past the end.
        let truncated = malformed(&[0x0a, 0x05, b'a']).unwrap();
        assert!(truncated.contains("buffer underflow"), "{truncated}");
        assert_eq!(malformed(&QueryRequest::new("true").encode_to_vec()), None);
    }

    #[test]
    fn a_query_that_is_not_utf8_is_repaired() {
        let mut bytes = QueryRequest::new("host = \"ab\"").encode_to_vec();
        let at = bytes.iter().position(|&b| b == b'b').unwrap();
        bytes[at] = 0xff;
        assert!(Generated::decode(bytes.as_slice()).is_err());
        let request = QueryRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(request.query, "host = \"a?\"");
        assert!(request.repaired());
    }
}
