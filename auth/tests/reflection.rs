//! gRPC server reflection: a client that has no `.proto` (grpcurl, grpcui, Postman) lists the
//! Auth API's services and gets the descriptor of `postern.auth.v1.AuthService`.

mod support;

use support::*;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn ask(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    req: MessageRequest,
) -> MessageResponse {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(req),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    answers
        .message()
        .await
        .unwrap()
        .expect("one answer")
        .message_response
        .expect("a response")
}

#[tokio::test]
async fn reflection_lists_the_auth_service_and_its_descriptor() {
    let dir = TempDir::new("refl");
    let srv = start(&dir.0, "refl").await;
    let admin = srv.admin().await;
    let mut client = ServerReflectionClient::new(admin.channel());
    let MessageResponse::ListServicesResponse(list) =
        ask(&mut client, MessageRequest::ListServices(String::new())).await
    else {
        panic!("not a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"postern.auth.v1.AuthService"), "{names:?}");
    let MessageResponse::FileDescriptorResponse(files) = ask(
        &mut client,
        MessageRequest::FileContainingSymbol("postern.auth.v1.AuthService".into()),
    )
    .await
    else {
        panic!("not a file descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    srv.stop().await;
}
